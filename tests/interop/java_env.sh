# Sourced by the scripts that run Kafka's Java tools (JARS set first): a scratch folder $LOG,
# removed on exit, with a log4j configuration that prints warnings on stderr; J, which runs a
# tool class from the jars in $JARS with it; and round_trip.
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
# round_trip BOOTSTRAP TOPIC CLIENT_PROPERTIES: TopicCommand creates TOPIC (2 partitions), the
# console producer writes 1..100 with acks=all, the console consumer reads them all back.
round_trip() {
  local bs=$1 topic=$2 props=$3
  J org.apache.kafka.tools.TopicCommand --bootstrap-server "$bs" --command-config "$props" \
    --create --topic "$topic" --partitions 2 --replication-factor 1
  seq 1 100 | J org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$bs" --topic "$topic" \
    --producer.config "$props" --producer-property acks=all
  J org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$bs" --topic "$topic" \
    --consumer.config "$props" --from-beginning --max-messages 100 --timeout-ms 30000 \
    > "$LOG/consumed"
  [ "$(grep -E '^[0-9]+$' "$LOG/consumed" | sort -n | tr '\n' ' ')" = "$(seq 1 100 | tr '\n' ' ')" ] || {
    echo "the console consumer read back something else: $(head -c 300 "$LOG/consumed")"; exit 1; }
}
