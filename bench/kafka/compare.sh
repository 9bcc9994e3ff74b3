#!/usr/bin/env bash
# Kafka's own perf tools against Apache Kafka and against Spate, side by side in one run.
#
#   bench/kafka/compare.sh [N] [REP]     (defaults: 1000000 records, 1 repetition)
#
# Starts a single-node Apache Kafka 4.x broker with its defaults (no per-message fsync) through
# ../shared/tools/kafka/kafka.sh on 127.0.0.1:19092, and a release build of Spate with
# `--fsync batch` (another policy with SPATE_FSYNC=...) on 127.0.0.1:29092, then runs
# ProducerPerformance (acks=all, unthrottled) and ConsumerPerformance for 100 B and 1 KiB records on
# 1 and 3 partitions against each, and prints a Markdown table with both. Everything runs on
# loopback and stops by itself; data goes under /tmp.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-1000000}
REP=${2:-1}
TOOLS=${KAFKA_TOOLS:-../shared/tools/kafka/kafka.sh}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spate-target}"
KAFKA_VERSION=${KAFKA_VERSION:-4.4.0}
JARS=${KAFKA_JARS:-/tmp/kafka-jars/$KAFKA_VERSION}
LOG4J=/tmp/anchor-kafka/log4j2.properties
SPATE_DATA=$(mktemp -d /tmp/spate-bench.XXXXXX)
SPATE_ADDR=127.0.0.1:29092
KAFKA_ADDR=127.0.0.1:19092

cargo build --release -q -p spate
bash "$TOOLS" fetch >/dev/null
bash "$TOOLS" start >/dev/null
# Both servers get the same consumer group setting: the Kafka broker started by the tool runs with
# group.initial.rebalance.delay.ms=0 (read from its config), so Spate's first rebalance of a group
# does not wait either; otherwise every ConsumerPerformance row of Spate would carry 300 ms more.
GROUP_DELAY=$(grep -oE '^group.initial.rebalance.delay.ms=[0-9]+' /tmp/anchor-kafka/server.properties | cut -d= -f2)
SPATE_GROUP_INITIAL_REBALANCE_DELAY_MS=${GROUP_DELAY:-3000} \
  "$CARGO_TARGET_DIR/release/spate" serve --data-dir "$SPATE_DATA/data" --http-addr 127.0.0.1:0 \
  --kafka-addr "$SPATE_ADDR" --fsync "${SPATE_FSYNC:-batch}" >"$SPATE_DATA/out" 2>"$SPATE_DATA/err" &
SPATE_PID=$!
cleanup() {
  kill "$SPATE_PID" 2>/dev/null || true
  wait "$SPATE_PID" 2>/dev/null || true
  bash "$TOOLS" stop >/dev/null 2>&1 || true
  rm -rf "$SPATE_DATA"
}
trap cleanup EXIT
for _ in $(seq 100); do grep -q '^kafka:' "$SPATE_DATA/out" 2>/dev/null && break; sleep 0.1; done

J() { java -cp "$JARS/*" -Dlog4j2.configurationFile="$LOG4J" "$@"; }

# Before each run: the page cache's dirty data written out. Kafka acknowledges from the page cache,
# and the kernel writes its data back tens of seconds later, into whichever run comes next; a
# server whose acknowledgements wait for fsyncs would otherwise share the disk with the other's
# write-back.
settle() { sync; }

run() { # server-address topic partitions size -> "producer-line|consumer-line"
  local bs=$1 t=$2 parts=$3 size=$4
  settle
  J org.apache.kafka.tools.TopicCommand --bootstrap-server "$bs" --create --topic "$t" \
    --partitions "$parts" --replication-factor 1 >/dev/null
  local p c
  p=$(timeout 600 java -cp "$JARS/*" -Dlog4j2.configurationFile="$LOG4J" \
    org.apache.kafka.tools.ProducerPerformance --topic "$t" --num-records "$N" --record-size "$size" \
    --throughput -1 --producer-props bootstrap.servers="$bs" acks=all | tail -1)
  c=$(timeout 600 java -cp "$JARS/*" -Dlog4j2.configurationFile="$LOG4J" \
    org.apache.kafka.tools.ConsumerPerformance --bootstrap-server "$bs" --topic "$t" \
    --num-records "$N" --timeout 60000 2>/dev/null | tail -1)
  echo "$p|$c"
}

# "N records sent, X records/sec (Y MB/sec), A ms avg latency, M ms max latency, a ms 50th, b ms 95th, c ms 99th, d ms 99.9th."
field() { echo "$1" | tr ',' '\n' | grep "$2" | grep -oE '[0-9]+(\.[0-9]+)?' | head -1; }

echo "# Kafka perf tools, $N records, acks=all, $(date -u +%Y-%m-%d), $(nproc) CPUs, $(java -version 2>&1 | head -1)"
echo
echo "| partitions | record B | server | produce records/s | produce MB/s | p50 ms | p99 ms | consume MB/s | consume records/s |"
echo "|---|---|---|---|---|---|---|---|---|"
for parts in 1 3; do
  for size in 100 1024; do
    for r in $(seq 1 "$REP"); do
      for server in kafka spate; do
        bs=$KAFKA_ADDR; [ "$server" = spate ] && bs=$SPATE_ADDR
        out=$(run "$bs" "perf-p$parts-s$size-r$r" "$parts" "$size")
        p=${out%%|*}; c=${out#*|}
        rps=$(echo "$p" | grep -oE '[0-9.]+ records/sec' | grep -oE '[0-9.]+')
        mbs=$(echo "$p" | grep -oE '\([0-9.]+ MB/sec\)' | grep -oE '[0-9.]+')
        p50=$(field "$p" '50th'); p99=$(field "$p" ' 99th')
        # ConsumerPerformance: start, end, MB, MB/sec, nMsg, nMsg/sec, ...
        cmb=$(echo "$c" | cut -d, -f4 | tr -d ' '); cmsg=$(echo "$c" | cut -d, -f6 | tr -d ' ')
        echo "| $parts | $size | $server | $rps | $mbs | $p50 | $p99 | $cmb | $cmsg |"
      done
    done
  done
done

# The same matrix with `spate bench kafka`, a load generator that needs a fraction of a core: the
# Java producer alone takes more than one of two cores, so above the servers are measured through
# it. First with the Java producer's defaults (16 KiB batches, 5 requests in flight, one
# connection), then with four connections.
for conns in 1 4; do
  echo
  echo "spate bench kafka: $N records, acks=all, 16 KiB batches, 5 in flight, $conns connection(s)"
  echo
  echo "| partitions | record B | server | produce records/s | produce MiB/s | request p50 ms | p99 ms | p99.9 ms | consume records/s |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for parts in 1 3; do
    for size in 100 1024; do
      for r in $(seq 1 "$REP"); do
        for server in kafka spate; do
          bs=$KAFKA_ADDR; [ "$server" = spate ] && bs=$SPATE_ADDR
          t="gen-c$conns-p$parts-s$size-r$r"
          J org.apache.kafka.tools.TopicCommand --bootstrap-server "$bs" --create --topic "$t" \
            --partitions "$parts" --replication-factor 1 >/dev/null
          settle
          out=$(timeout 600 "$CARGO_TARGET_DIR/release/spate" bench kafka --bootstrap "$bs" \
            --topic "$t" --records "$N" --record-size "$size" --connections "$conns")
          p=$(echo "$out" | grep '^produce:'); c=$(echo "$out" | grep '^consume:')
          num() { echo "$1" | grep -oE "[0-9.]+ $2" | head -1 | grep -oE '^[0-9.]+'; }
          lat() { echo "$1" | grep -oE "$2 [0-9.]+ ms" | grep -oE '[0-9.]+ ms' | grep -oE '^[0-9.]+'; }
          echo "| $parts | $size | $server | $(num "$p" records/s) | $(num "$p" MiB/s) | $(lat "$p" p50) | $(lat "$p" p99) | $(lat "$p" p99.9) | $(num "$c" records/s) |"
        done
      done
    done
  done
done
