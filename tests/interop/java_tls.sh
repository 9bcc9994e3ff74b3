#!/usr/bin/env bash
# Kafka's own Java tools connecting to Spate over TLS (security.protocol SSL, a PEM trust store,
# host name checked): TopicCommand creates a topic, the console producer and consumer round-trip
# records.
# usage: java_tls.sh BOOTSTRAP JARS_DIR CA_FILE
set -euo pipefail
BS=$1
JARS=$2
CA=$3
# shellcheck source=java_env.sh
source "$(dirname "$0")/java_env.sh"
cat > "$LOG/tls.properties" <<P
security.protocol=SSL
ssl.truststore.type=PEM
ssl.truststore.location=$CA
default.api.timeout.ms=10000
request.timeout.ms=5000
P
J org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --command-config "$LOG/tls.properties" \
  --create --topic java-tls --partitions 2 --replication-factor 1
seq 1 100 | J org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$BS" --topic java-tls \
  --producer.config "$LOG/tls.properties" --producer-property acks=all
J org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$BS" --topic java-tls \
  --consumer.config "$LOG/tls.properties" --from-beginning --max-messages 100 --timeout-ms 30000 \
  > "$LOG/consumed"
[ "$(grep -E '^[0-9]+$' "$LOG/consumed" | sort -n | tr '\n' ' ')" = "$(seq 1 100 | tr '\n' ' ')" ] || {
  echo "the console consumer read back something else: $(head -c 300 "$LOG/consumed")"; exit 1; }
echo "java tools over TLS: topic created, 100 records round-tripped"
