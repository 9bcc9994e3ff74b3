# Sourced by the comparison scripts: installs Debian's postgresql when missing, starts a fresh
# cluster as the `postgres` user from a temporary data directory on 127.0.0.1:55432
# (synchronous_commit=on, fsync=on), and stops it when the script exits. Sets PG_CONN.
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
cleanup_postgres() {
  as_pg "$bin/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PGDIR"
}
trap cleanup_postgres EXIT
PG_CONN="host=127.0.0.1 port=55432 user=postgres dbname=postgres"
