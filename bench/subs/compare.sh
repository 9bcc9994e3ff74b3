#!/usr/bin/env bash
# Durable subscriptions: Spate (--fsync batch, acks durable before they are answered) against Redis
# Streams consumer groups (XREADGROUP + XACK; appendonly yes, appendfsync everysec), side by side in
# one run of `spate bench subs`.
#
#   bench/subs/compare.sh [extra `spate bench subs` flags]
#
# `--fsync interval:1000` runs Spate with the durability Redis has here (an fsync every second),
# `--fsync never` without fsyncs, to show what durable acks cost on the machine's disk.
#
# Needs Debian's redis-server (installed when missing). Redis runs from a temporary directory on
# 127.0.0.1:56379 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spate-target}"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
if ! command -v redis-server >/dev/null; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq redis-server
fi
REDIS_DIR=$(mktemp -d /tmp/spate-redis.XXXXXX)
redis-server --bind 127.0.0.1 --port 56379 --dir "$REDIS_DIR" --appendonly yes \
  --appendfsync everysec --save "" --daemonize no --logfile "$REDIS_DIR/log" &
REDIS_PID=$!
cleanup() {
  kill "$REDIS_PID" 2>/dev/null || true
  wait "$REDIS_PID" 2>/dev/null || true
  rm -rf "$REDIS_DIR"
}
trap cleanup EXIT
for _ in $(seq 50); do
  if redis-cli -p 56379 ping >/dev/null 2>&1; then break; fi
  sleep 0.1
done
cargo build --release -q -p spate
"$CARGO_TARGET_DIR/release/spate" bench subs --redis 127.0.0.1:56379 "$@"
