#!/usr/bin/env bash
# Event-sourcing appends and stream reads: Spate (--fsync batch) against PostgreSQL used as an event
# store (unique (stream_id, version), one INSERT per append, synchronous_commit=on, fsync on), side
# by side in one run of `spate bench streams`.
#
#   bench/streams/compare.sh [extra `spate bench streams` flags]
#
# Needs Debian's postgresql package (installed when missing). PostgreSQL runs as the `postgres`
# user from a temporary data directory on 127.0.0.1:55432 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spate-target}"
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq postgresql
fi
bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
PGDIR=$(mktemp -d /tmp/spate-pg.XXXXXX)
chown postgres "$PGDIR" 2>/dev/null || true
as_pg() { if [ "$(id -un)" = postgres ]; then "$@"; else $sudo runuser -u postgres -- "$@"; fi; }
as_pg "$bin/initdb" -D "$PGDIR/data" -A trust -U postgres >/dev/null
as_pg "$bin/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w \
  -o "-c listen_addresses=127.0.0.1 -c port=55432 -c unix_socket_directories=$PGDIR -c synchronous_commit=on -c fsync=on" start >/dev/null
cleanup() {
  as_pg "$bin/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PGDIR"
}
trap cleanup EXIT
cargo build --release -q -p spate
"$CARGO_TARGET_DIR/release/spate" bench streams \
  --postgres "host=127.0.0.1 port=55432 user=postgres dbname=postgres" "$@"
