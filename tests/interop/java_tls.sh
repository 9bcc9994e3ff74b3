#!/usr/bin/env bash
# Kafka's own Java tools connecting to Spate over TLS (security.protocol SSL, a PEM trust store,
# host name checked): TopicCommand creates a topic, the console producer and consumer round-trip
# records.
# With a client certificate and its key (mutual TLS), they present it from a PEM key store.
# usage: java_tls.sh BOOTSTRAP JARS_DIR CA_FILE [CLIENT_CERT CLIENT_KEY]
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
topic=java-tls
if [ $# -ge 5 ]; then
  # A PEM key store holds the (PKCS#8) key and the certificate chain in one file.
  cat "$5" "$4" > "$LOG/keystore.pem"
  printf 'ssl.keystore.type=PEM\nssl.keystore.location=%s\n' "$LOG/keystore.pem" >> "$LOG/tls.properties"
  topic=java-mtls
fi
round_trip "$BS" "$topic" "$LOG/tls.properties"
echo "java tools over TLS ($topic): topic created, 100 records round-tripped"
