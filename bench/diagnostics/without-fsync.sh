#!/usr/bin/env bash
# Diagnostic, not a configuration: runs a `spate bench` workload with fsync, fdatasync and
# sync_file_range turned into no-ops (an LD_PRELOAD shim built here), in the bench process and the server it starts. The
# difference from a normal run is what the fsyncs cost; what is left is the ceiling of the code
# path itself on this machine. Acknowledged data is NOT durable in such a run.
#
#   bench/diagnostics/without-fsync.sh subs --messages 200000 --runs 3
#   bench/diagnostics/without-fsync.sh streams --seconds 10
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/spate-target}"
if [ $# -eq 0 ]; then
  echo "usage: $0 <spate bench subcommand> [flags]" >&2
  exit 2
fi
SHIM_DIR=$(mktemp -d /tmp/spate-nofsync.XXXXXX)
trap 'rm -rf "$SHIM_DIR"' EXIT
cat > "$SHIM_DIR/nofsync.c" <<'C'
int fsync(int fd) { (void)fd; return 0; }
int fdatasync(int fd) { (void)fd; return 0; }
int sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags) {
  (void)fd; (void)offset; (void)nbytes; (void)flags; return 0;
}
C
cc -shared -fPIC -O2 -o "$SHIM_DIR/nofsync.so" "$SHIM_DIR/nofsync.c"
cargo build --release -q -p spate
LD_PRELOAD="$SHIM_DIR/nofsync.so" "$CARGO_TARGET_DIR/release/spate" bench "$@"
