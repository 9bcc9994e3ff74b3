#!/usr/bin/env bash
# Projections: a count + sum aggregate folded by Spate (--fsync batch) against PostgreSQL doing the
# same with INSERT ... ON CONFLICT DO UPDATE in transactions of 1,000 (synchronous_commit=on), side
# by side in one run of `spate bench projections`.
#
#   bench/projections/compare.sh [extra `spate bench projections` flags]
#
# Runs 3 times by default (`--runs N`), each Spate then PostgreSQL, and reports medians.
# Needs Debian's postgresql package (installed when missing). PostgreSQL runs as the `postgres`
# user from a temporary data directory on 127.0.0.1:55432 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spate-target}"
. bench/postgres.sh
cargo build --release -q -p spate
"$CARGO_TARGET_DIR/release/spate" bench projections \
  --postgres "$PG_CONN" "$@"
