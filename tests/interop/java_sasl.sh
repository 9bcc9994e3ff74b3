#!/usr/bin/env bash
# Kafka's own Java tools authenticating to Spate with SASL/PLAIN, an access token as the password:
# TopicCommand creates a topic, the console producer and consumer round-trip records; a wrong
# password is refused.
# usage: java_sasl.sh BOOTSTRAP JARS_DIR TOKEN
set -euo pipefail
BS=$1
JARS=$2
TOKEN=$3
# shellcheck source=java_env.sh
source "$(dirname "$0")/java_env.sh"
props() { # password -> a client configuration
  cat <<P
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="java" password="$1";
default.api.timeout.ms=10000
request.timeout.ms=5000
P
}
props "$TOKEN" > "$LOG/good.properties"
props "not-the-token-0123456789" > "$LOG/bad.properties"

round_trip "$BS" java-sasl "$LOG/good.properties"
# Without J's stderr filter, so that the error is in the file when it is read.
if java -cp "$JARS/*" -Dlog4j2.configurationFile="$LOG/log4j2.properties" \
  org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --command-config "$LOG/bad.properties" \
  --list > "$LOG/listed" 2> "$LOG/refused"; then
  echo "a wrong password listed topics: $(cat "$LOG/listed")"; exit 1
fi
# TopicCommand prints the server's message ("Authentication failed: invalid credentials").
grep -qi "authentication failed" "$LOG/listed" "$LOG/refused" || {
  echo "no authentication error: $(cat "$LOG/listed" "$LOG/refused")"; exit 1; }
echo "java tools with SASL/PLAIN: topic created, 100 records round-tripped, a wrong password refused"
