#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for CI and local runs.
#
#   eval "$(.ci/postgres.sh start)"   start one; prints the exports to eval:
#                                     MEMBENCH_PG_URL, MEMBENCH_PG_DIR, ...
#   .ci/postgres.sh stop [DIR]        stop it and remove its folder
#                                     (DIR defaults to $MEMBENCH_PG_DIR)
#   .ci/postgres.sh run CMD [ARG...]  start one, run CMD with the exports set,
#                                     stop it whatever CMD does
#
# The server binaries come from PATH or /usr/lib/postgresql/*/bin; when there
# are none, the Debian package `postgresql` is installed. The data folder lives
# under a fresh mktemp folder and goes away on stop. The server listens on
# 127.0.0.1 only, on $MEMBENCH_PG_PORT when set, else 55432 when free, else a
# free port. It holds a role `membench` (password `membench`, may create
# databases) owning a database `membench`. Run as root, the server runs as the
# `postgres` user (created when missing), since PostgreSQL refuses root.
set -euo pipefail

PG_USER_DEFAULT=postgres
ROLE=membench
DATABASE=membench
PASSWORD=membench

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local dir
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null \
        && command -v postgres >/dev/null; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x $dir/pg_ctl && -x $dir/initdb && -x $dir/postgres ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

install_server() {
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    log "no PostgreSQL server binaries found; installing the Debian package"
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y postgresql >&2
}

port_free() {
    python3 - "$1" <<'EOF'
import socket, sys
with socket.socket() as sock:
    try:
        sock.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
}

pick_port() {
    if [[ -n ${MEMBENCH_PG_PORT:-} ]]; then
        echo "$MEMBENCH_PG_PORT"
    elif port_free 55432; then
        echo 55432
    else
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    fi
}

# Run a command as the server's owner: `postgres` when we are root, else us.
# From `/`, since the owner may not be allowed into the current folder.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u "$PG_USER_DEFAULT" -- "$@")
    else
        "$@"
    fi
}

start() {
    local bindir port top data
    bindir=$(find_bindir) || { install_server; bindir=$(find_bindir); }
    if [[ $(id -u) -eq 0 ]] && ! id "$PG_USER_DEFAULT" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin \
            "$PG_USER_DEFAULT"
    fi
    port=$(pick_port)
    top=$(mktemp -d "${TMPDIR:-/tmp}/membench-pg.XXXXXX")
    data=$top/data
    [[ $(id -u) -ne 0 ]] || chown "$PG_USER_DEFAULT:" "$top"

    as_owner "$bindir/initdb" -D "$data" --username=postgres --auth-local=trust \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C >"$top/initdb.log"
    # A throwaway server: durability is traded for speed, and there is room
    # for naive clients that open a connection per request.
    as_owner "$bindir/pg_ctl" -D "$data" -l "$top/server.log" -w -t 60 start -o "\
        -c listen_addresses=127.0.0.1 -p $port -k $top \
        -c max_connections=300 -c fsync=off -c synchronous_commit=off \
        -c full_page_writes=off" >&2 \
        || { cat "$top/server.log" >&2; exit 1; }

    as_owner "$bindir/psql" -h "$top" -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 -q >&2 <<EOF
CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
CREATE DATABASE $DATABASE OWNER $ROLE;
EOF
    log "server pid $(head -1 "$data/postmaster.pid") on 127.0.0.1:$port, data in $data"
    cat <<EOF
export MEMBENCH_PG_URL=postgresql+asyncpg://$ROLE:$PASSWORD@127.0.0.1:$port/$DATABASE
export MEMBENCH_PG_DIR=$top
export MEMBENCH_PG_DATA=$data
export MEMBENCH_PG_BINDIR=$bindir
EOF
}

stop() {
    local top=${1:-${MEMBENCH_PG_DIR:-}} bindir
    if [[ -z $top || ! -d $top/data ]]; then
        log "no server folder to stop (give DIR or set MEMBENCH_PG_DIR)"
        return 1
    fi
    bindir=${MEMBENCH_PG_BINDIR:-$(find_bindir)}
    if [[ -f $top/data/postmaster.pid ]]; then
        as_owner "$bindir/pg_ctl" -D "$top/data" -m fast -w -t 30 stop >&2 \
            || kill -KILL "$(head -1 "$top/data/postmaster.pid")" 2>/dev/null \
            || true
    fi
    rm -rf -- "$top"
    log "stopped; removed $top"
}

run() {
    local exports status=0
    exports=$(start)
    eval "$exports"
    trap 'stop "$MEMBENCH_PG_DIR"' EXIT
    "$@" || status=$?
    return $status
}

case ${1:-} in
    start) start ;;
    stop) shift; stop "$@" ;;
    run) shift; [[ $# -gt 0 ]] || { log "run needs a command"; exit 2; }; run "$@" ;;
    *) log "usage: $0 {start|stop [DIR]|run CMD [ARG...]}"; exit 2 ;;
esac
