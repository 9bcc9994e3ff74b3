#!/usr/bin/env bash
# Kafka's own Java tools against Spate's Kafka listener: TopicCommand, the console producer and
# consumer (with keys and a consumer group), the consumer group command, the config command,
# ProducerPerformance and ConsumerPerformance, the log dirs and delete records commands.
# usage: java_tools.sh BOOTSTRAP JARS_DIR
set -euo pipefail
BS=$1
JARS=$2
# shellcheck source=java_env.sh
source "$(dirname "$0")/java_env.sh"

J org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --create --topic java --partitions 3 --replication-factor 1
J org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --list | grep -qx java
# Console producer with keys; console consumer in a group reads them back with keys.
seq 1 300 | sed 's/^\(.*\)$/k\1:v\1/' | J org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$BS" \
  --topic java --property parse.key=true --property key.separator=: --producer-property acks=all
J org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$BS" --topic java --from-beginning \
  --group java-console --max-messages 300 --timeout-ms 30000 --property print.key=true \
  --property key.separator=: > "$LOG/consumed"
got=$(grep "^k" "$LOG/consumed" | sort | tr '\n' ' ')
want=$(seq 1 300 | sed 's/^\(.*\)$/k\1:v\1/' | sort | tr '\n' ' ')
[ "$got" = "$want" ] || { echo "console consumer read back something else"; exit 1; }
echo "console producer and consumer: 300 keyed records round-tripped"
# The consumer group command: list, describe, reset the offsets, delete some, delete the group.
G=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
J $G --bootstrap-server "$BS" --list | grep -qx java-console
lag() { J $G --bootstrap-server "$BS" --describe --group java-console | awk '$1 == "java-console" { s += $6 } END { print s + 0 }'; }
[ "$(lag)" = 0 ] || { echo "the group has lag after reading everything"; exit 1; }
J $G --bootstrap-server "$BS" --reset-offsets --to-earliest --execute --group java-console --topic java > /dev/null
[ "$(lag)" = 300 ] || { echo "offsets reset to the earliest do not show 300 records of lag"; exit 1; }
J $G --bootstrap-server "$BS" --delete-offsets --group java-console --topic java:0 | grep -q "^java *0 *Successful"
partitions=$(J $G --bootstrap-server "$BS" --describe --group java-console | awk '$1 == "java-console" { print $3 }' | sort | tr '\n' ' ')
[ "$partitions" = "1 2 " ] || { echo "offsets left after deleting partition 0's: $partitions"; exit 1; }
J $G --bootstrap-server "$BS" --delete --group java-console | grep -q "was successful"
if J $G --bootstrap-server "$BS" --list | grep -qx java-console; then echo "a deleted group is listed"; exit 1; fi
if J $G --bootstrap-server "$BS" --delete --group java-console 2>&1 | grep -q "was successful"; then
  echo "a group deleted twice"; exit 1
fi
echo "consumer group command: described, reset, offsets deleted, group deleted"
# The config command: change topic settings, read them back, put one back to its default; a bad
# value is refused.
C() { J org.apache.kafka.tools.ConfigCommand --bootstrap-server "$BS" --entity-type topics --entity-name java "$@"; }
C --alter --add-config retention.ms=3600000,max.message.bytes=65536 | grep -q "Completed updating config"
dynamic() { C --describe | awk '/=/ { sub(/ .*/, "", $1); print $1 }' | sort | tr '\n' ' '; }
[ "$(dynamic)" = "max.message.bytes=65536 retention.ms=3600000 " ] || { echo "configs after --alter: $(dynamic)"; exit 1; }
C --alter --delete-config max.message.bytes > /dev/null
[ "$(dynamic)" = "retention.ms=3600000 " ] || { echo "configs after --delete-config: $(dynamic)"; exit 1; }
if C --alter --add-config retention.ms=soon > "$LOG/bad" 2>&1; then echo "retention.ms=soon was accepted"; exit 1; fi
grep -q InvalidConfigurationException "$LOG/bad" || { cat "$LOG/bad"; exit 1; }
[ "$(dynamic)" = "retention.ms=3600000 " ] || { echo "configs after a refused change: $(dynamic)"; exit 1; }
echo "config command: topic settings changed, described, reset; a bad value refused"
# The perf tools (idempotent producer by default in 4.x; consumer in a group).
J org.apache.kafka.tools.ProducerPerformance --topic java --num-records 50000 --record-size 512 \
  --throughput -1 --producer-props bootstrap.servers="$BS" acks=all | tail -1 | tee "$LOG/p"
grep -q '^50000 records sent' "$LOG/p"
J org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$BS" --topic java \
  --num-records 50300 --timeout 60000 --group java-perf | tail -1 | tee "$LOG/c"
[ "$(cut -d, -f5 "$LOG/c" | tr -d ' ')" = 50300 ] || { echo "ConsumerPerformance did not read 50300 records"; exit 1; }
# Adding partitions is refused with the reason; the log dirs command lists the partitions' sizes.
if J org.apache.kafka.tools.TopicCommand --bootstrap-server "$BS" --alter --topic java --partitions 4 > "$LOG/alter" 2>&1; then
  echo "adding partitions was accepted"; exit 1
fi
grep -q "keeps the 3 partitions" "$LOG/alter" || { cat "$LOG/alter"; exit 1; }
J org.apache.kafka.tools.LogDirsCommand --bootstrap-server "$BS" --describe --topic-list java > "$LOG/dirs"
sizes=$(grep '^{' "$LOG/dirs" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sorted(p["partition"] for b in d["brokers"] for l in b["logDirs"] for p in l["partitions"] if p["size"] > 0))')
[ "$sizes" = "['java-0', 'java-1', 'java-2']" ] || { echo "log dirs list: $sizes"; cat "$LOG/dirs"; exit 1; }
echo "partitions: adding refused with the reason; log dirs list the partitions with their sizes"
# Deleting records: partition 0 of the topic starts at offset 5 afterwards, for every client.
echo '{"version": 1, "partitions": [{"topic": "java", "partition": 0, "offset": 5}]}' > "$LOG/delete.json"
J org.apache.kafka.tools.DeleteRecordsCommand --bootstrap-server "$BS" --offset-json-file "$LOG/delete.json" \
  | grep -q "java-0.*low_watermark: 5" || { echo "DeleteRecordsCommand did not report low_watermark 5"; exit 1; }
earliest=$(J org.apache.kafka.tools.GetOffsetShell --bootstrap-server "$BS" --topic java --partitions 0 --time -2)
[ "$earliest" = "java:0:5" ] || { echo "earliest offset after deleting records: $earliest"; exit 1; }
echo "delete records command: partition 0 starts at offset 5"
echo "java tools: all checks passed"
