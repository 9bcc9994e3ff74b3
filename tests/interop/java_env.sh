# Sourced by the scripts that run Kafka's Java tools (JARS set first): a scratch folder $LOG,
# removed on exit, with a log4j configuration that prints warnings on stderr, and J, which runs
# a tool class from the jars in $JARS with it.
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT
cat > "$LOG/log4j2.properties" <<'L4J'
status = warn
appender.console.type = Console
appender.console.name = STDERR
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %p %m%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
L4J
J() { java -cp "$JARS/*" -Dlog4j2.configurationFile="$LOG/log4j2.properties" "$@" 2> >(grep -v SLF4J >&2); }
