#!/usr/bin/env bash
# The production topology on this machine: omerowebd running real OMERO.web
# (gunicorn), behind a real nginx that includes the server file omerowebd
# writes, so static files, the maintenance page and redirects are served the
# way a site serves them. The last line printed is the address to open.
#
# On a terminal, Enter stops omerowebd (nginx then shows the maintenance page)
# and Enter again starts it. Ctrl-C stops both; nothing is left running.
# Installs what it needs first (scripts/bootstrap.sh).
#
#   OMEROWEBD_DEMO_CONFIG=FILE   run on FILE instead of examples/demo.toml (the
#                                tests do, with free ports and their own dirs)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${OMEROWEBD_DEMO_CONFIG:-examples/demo.toml}
scripts/bootstrap.sh

# What the config means, as the daemon reads it (its own parser, its defaults).
values=$(.venv/bin/python - "$config" <<'EOF'
import shlex, sys
from omerowebd import config as config_module
from omerowebd.errors import ConfigErrors, UserError
try:
    c = config_module.load(sys.argv[1])
except UserError as e:
    for problem in e.problems if isinstance(e, ConfigErrors) else [str(e)]:
        print(f"demo: {problem}", file=sys.stderr)
    sys.exit(78)
listen = c.nginx.listen.split()[0]
address = listen if ":" in listen else f"127.0.0.1:{listen}"
prefix = c.properties.get("omero.web.prefix", "").rstrip("/")
for name, value in {
    "omerodir": c.daemon.omerodir,
    "state_dir": c.daemon.state_dir,
    "site_dir": c.nginx.output_dir or c.daemon.state_dir / "nginx",
    "url": f"http://{address}{prefix}/webclient/login/",
    "reload_command": " ".join(c.nginx.reload_command or ()),
}.items():
    print(f"{name}={shlex.quote(str(value))}")
EOF
)
eval "$values"
nginx_dir=$state_dir/demo-nginx
case " $reload_command " in
    *" $nginx_dir/nginx.conf "*) ;;
    *) echo "demo: $config: nginx.reload_command must reload the demo's nginx: -c $nginx_dir/nginx.conf" >&2; exit 78 ;;
esac
ctl=(.venv/bin/omerowebctl --config "$config")

# nginx's workers run unprivileged: they read the static files below OMERODIR,
# and the server file and maintenance page below the state dir (its sessions
# directory stays the daemon's alone, mode 0700).
mkdir -p "$omerodir" "$nginx_dir"
chmod 0755 "$state_dir"
sed -e "s|@DIR@|$nginx_dir|g" -e "s|@SITE@|$site_dir|g" examples/demo-nginx.conf > "$nginx_dir/nginx.conf"
nginx=(/usr/sbin/nginx -c "$nginx_dir/nginx.conf" -p "$nginx_dir/" -e "$nginx_dir/error.log")

nginx_pid="" daemon_pid=""

stop_daemon() {
    if [ -n "$daemon_pid" ]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true  # it stops its gunicorn first
        daemon_pid=""
    fi
}

finish() {
    trap '' INT TERM
    echo "demo: stopping omerowebd and nginx"
    stop_daemon
    if [ -n "$nginx_pid" ]; then
        kill -QUIT "$nginx_pid" 2>/dev/null || true
        wait "$nginx_pid" 2>/dev/null || true
    fi
    echo "demo: stopped"
}
trap finish EXIT
trap 'exit 0' INT  # Ctrl-C is how the demo ends
trap 'exit 143' TERM

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

fail() {
    echo "demo: $*" >&2
    exit 1
}

start_daemon() {
    .venv/bin/omerowebd --config "$config" </dev/null &
    daemon_pid=$!
    until "${ctl[@]}" status >/dev/null 2>&1; do
        alive "$daemon_pid" || { wait "$daemon_pid" && rc=0 || rc=$?; daemon_pid=""; fail "omerowebd exited with status $rc (its message is above)"; }
        sleep 0.5
    done
    # omerowebd serves once OMERO.web answers and nginx has been reloaded on its files.
    for _ in $(seq 120); do
        curl -fsS -o /dev/null --max-time 10 "$url" 2>/dev/null && return 0
        sleep 0.5
    done
    fail "nginx does not answer $url: see $nginx_dir/error.log"
}

"${nginx[@]}" -g 'daemon off;' </dev/null &
nginx_pid=$!
# The master writes its pid once it has read its config and bound its port.
until [ "$(cat "$nginx_dir/nginx.pid" 2>/dev/null)" = "$nginx_pid" ]; do
    alive "$nginx_pid" || { nginx_pid=""; fail "nginx could not start: $(tail -n 1 "$nginx_dir/error.log" 2>/dev/null)"; }
    sleep 0.2
done

start_daemon
echo
echo "demo: omerowebd (pid $daemon_pid) serves OMERO.web behind nginx (pid $nginx_pid), config $config"
if [ -t 0 ]; then
    echo "demo: Enter stops omerowebd (nginx then shows the maintenance page), Enter again starts it; Ctrl-C ends the demo"
fi
echo "demo: open $url"

if [ ! -t 0 ]; then
    # Not on a terminal: run until Ctrl-C (SIGINT), SIGTERM, or either process ends.
    wait -n "$daemon_pid" "$nginx_pid" && rc=0 || rc=$?
    alive "$nginx_pid" || nginx_pid=""
    alive "$daemon_pid" || daemon_pid=""
    fail "$( [ -z "$nginx_pid" ] && echo nginx || echo omerowebd) exited with status $rc"
fi

while :; do
    if read -r -t 1; then
        if [ -n "$daemon_pid" ]; then
            stop_daemon
            echo "demo: omerowebd stopped; nginx shows the maintenance page at $url. Enter starts omerowebd again"
        else
            start_daemon
            echo "demo: omerowebd (pid $daemon_pid) serves again; open $url"
        fi
    elif [ $? -le 128 ]; then
        exit 0  # end of input
    fi
    alive "$nginx_pid" || { wait "$nginx_pid" && rc=0 || rc=$?; nginx_pid=""; fail "nginx exited with status $rc"; }
    if [ -n "$daemon_pid" ] && ! alive "$daemon_pid"; then
        wait "$daemon_pid" && rc=0 || rc=$?
        daemon_pid=""
        echo "demo: omerowebd exited with status $rc; nginx shows the maintenance page at $url. Enter starts omerowebd again"
    fi
done
