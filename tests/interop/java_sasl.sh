#!/usr/bin/env bash
# Kafka's own Java tools authenticating to Spate with SASL/PLAIN, an access token as the password:
# TopicCommand creates a topic, the console producer and consumer round-trip records; a wrong
# password is refused.
# usage: java_sasl.sh BOOTSTRAP JARS_DIR TOKEN
set -euo pipefail
BS=$1
JARS=$2
TOKEN=$3
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
cat > "$DIR/log4j2.properties" <<'L4J'
status = warn
appender.console.type = Console
appender.console.name = STDERR
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %p %m%n
rootLogger.level = ERROR
rootLogger.appenderRef.stderr.ref = STDERR
L4J
props() { # password -> a client configuration
  cat <<P
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="java" password="$1";
default.api.timeout.ms=10000
request.timeout.ms=5000
P
}
props "$TOKEN" > "$DIR/good.properties"
props "not-the-token-0123456789" > "$DIR/bad.properties"
J() { java -cp "$JARS/*" -Dlog4j2.configurationFile="$DIR/log4j2.properties" "$@" 2> >(grep -v SLF4J >&2); }

J org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --command-config "$DIR/good.properties" \
  --create --topic java-sasl --partitions 2 --replication-factor 1
seq 1 100 | J org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$BS" --topic java-sasl \
  --producer.config "$DIR/good.properties" --producer-property acks=all
J org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$BS" --topic java-sasl \
  --consumer.config "$DIR/good.properties" --from-beginning --max-messages 100 --timeout-ms 30000 \
  > "$DIR/consumed"
[ "$(grep -E '^[0-9]+$' "$DIR/consumed" | sort -n | tr '\n' ' ')" = "$(seq 1 100 | tr '\n' ' ')" ] || {
  echo "the console consumer read back something else: $(head -c 300 "$DIR/consumed")"; exit 1; }
# Without J's stderr filter, so that the error is in the file when it is read.
if java -cp "$JARS/*" -Dlog4j2.configurationFile="$DIR/log4j2.properties" \
  org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --command-config "$DIR/bad.properties" \
  --list > "$DIR/listed" 2> "$DIR/refused"; then
  echo "a wrong password listed topics: $(cat "$DIR/listed")"; exit 1
fi
# TopicCommand prints the server's message ("Authentication failed: invalid credentials").
grep -qi "authentication failed" "$DIR/listed" "$DIR/refused" || {
  echo "no authentication error: $(cat "$DIR/listed" "$DIR/refused")"; exit 1; }
echo "java tools with SASL/PLAIN: topic created, 100 records round-tripped, a wrong password refused"
