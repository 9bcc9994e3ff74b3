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
. bench/postgres.sh
cargo build --release -q -p spate
"$CARGO_TARGET_DIR/release/spate" bench streams \
  --postgres "$PG_CONN" "$@"
