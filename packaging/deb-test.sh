#!/bin/bash
# Build the .deb, install it with apt-get, smoke-test the installed worker the way its unit runs
# it, capture real traffic through it with curl and with the installed ddump CLI, then purge the
# package and check that nothing is left. Needs root; loopback only.
# Usage: packaging/deb-test.sh [PATH.deb]       (default: build dist/ddump_<version>_<arch>.deb)
#
# No systemd runs as PID 1 here, so the unit is reproduced by hand: its ExecStart line and the
# installed /etc/default/ddump-worker, as user nobody with CAP_NET_RAW as the only (ambient)
# capability and no_new_privs (setpriv), in a mount namespace with /proc mounted
# subset=pid,hidepid=invisible (ProcSubset=, ProtectProc=) and a read-only root
# (ProtectSystem=strict), and under the unit's seccomp filters (packaging/unit_sandbox.py).
# Only the listen port differs: a free one.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"   # also when started as `sh deb-test.sh`
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PYENV_VERSION
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

UNIT=/lib/systemd/system/ddump-worker.service
DEFAULTS=/etc/default/ddump-worker

say() { echo "deb-test: $*" >&2; }
die() {
    say "FAIL: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (apt-get install, dpkg --purge, setpriv)"

work=$(mktemp -d "${TMPDIR:-/tmp}/ddump-deb-test.XXXXXX")
chmod 0755 "$work" # the worker, as nobody, reads nothing here, but curl/ddump output lands here
installed_by_us=0
pids=()

cleanup() {
    local status=$? pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$installed_by_us" = 1 ] && dpkg-query -W ddump >/dev/null 2>&1; then
        say "purging ddump after a failure"
        timeout 120 dpkg --purge ddump >/dev/null 2>&1 || true
    fi
    if [ "$status" != 0 ] && [ -f "$work/worker.log" ]; then
        say "worker log:"
        sed 's/^/    /' "$work/worker.log" >&2
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

apt_install() {
    say "installing $*"
    apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "$@" >/dev/null; } \
        || die "cannot install $*"
}
command -v curl >/dev/null || apt_install curl
command -v ping >/dev/null || apt_install iputils-ping
command -v tcpdump >/dev/null || apt_install tcpdump
/usr/bin/python3 -c 'import seccomp' 2>/dev/null || apt_install python3-seccomp
command -v systemd-analyze >/dev/null || apt_install systemd

# --- build and install -------------------------------------------------------------------------
if [ $# -ge 1 ]; then
    deb=$(realpath "$1")
else
    deb=$(bash "$repo/packaging/build-deb.sh" "$repo/dist" | tail -n 1)
fi
[ -f "$deb" ] || die "no package at $deb"

if dpkg-query -W -f='${Status}' ddump 2>/dev/null | grep -q installed; then
    say "ddump is already installed: purging it first"
    timeout 120 dpkg --purge ddump >/dev/null
fi
say "installing $deb"
installed_by_us=1
(cd "$(dirname "$deb")" && timeout 300 apt-get install -y -q "./$(basename "$deb")") >"$work/apt.log" 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && (cd "$(dirname "$deb")" \
        && timeout 300 apt-get install -y -q "./$(basename "$deb")") >"$work/apt.log" 2>&1; } \
    || { cat "$work/apt.log" >&2; die "apt-get install failed"; }

extcap=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH)/wireshark/extcap/ddump
for f in /usr/bin/ddump /usr/bin/ddump-worker /usr/bin/ddump-extcap "$extcap" "$UNIT" "$DEFAULTS" \
    /usr/share/man/man1/ddump.1.gz /usr/share/man/man1/ddump-worker.1.gz \
    /usr/share/man/man1/ddump-extcap.1.gz; do
    [ -e "$f" ] || die "the package did not install $f"
done
# Wireshark runs what is in its extcap folder: the installed extcap must answer it.
(cd / && env -i PATH="$PATH" "$extcap" --extcap-interfaces) | grep -q '^interface {value=ddump}' \
    || die "$extcap --extcap-interfaces does not name the ddump interface"
if command -v tshark >/dev/null; then
    (cd / && env -i PATH="$PATH" HOME="$work" tshark -D 2>/dev/null) | grep -q ' ddump (' \
        || die "tshark -D does not list the installed ddump extcap"
fi
dpkg-query -W -f='${Conffiles}\n' ddump | grep -q " $DEFAULTS " || die "$DEFAULTS is not a conffile"
head -n 1 /usr/bin/ddump-worker | grep -qx '#! */usr/bin/python3' \
    || die "/usr/bin/ddump-worker does not run on /usr/bin/python3: $(head -n 1 /usr/bin/ddump-worker)"
# With the man pages installed, this also checks the Documentation=man:... entries.
timeout 60 systemd-analyze verify "$UNIT" || die "systemd-analyze verify $UNIT"
timeout 60 systemd-analyze security --offline=yes "$UNIT" | tail -n 1 >&2
env -i PATH="$PATH" /usr/bin/ddump-worker --help >/dev/null || die "ddump-worker --help"
# From /, so that the installed package is imported, not a work tree's ddump/.
(cd / && env -i PATH="$PATH" /usr/bin/python3 -c '
import ddump.records as r
assert r.__file__.startswith("/usr/lib/python3/"), r.__file__
assert r.ENGINE == "c", r.ENGINE') \
    || die "the installed ddump lacks its C merge engine (ddump/_records.c)"

# --- run the worker as the unit would ------------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
opts=$(env -i sh -c "set -a; . $DEFAULTS; printf %s \"\$DDUMP_WORKER_OPTS\"")
case "$opts" in
*127.0.0.1:8475*) opts=${opts//127.0.0.1:8475/127.0.0.1:$port} ;;
*) die "$DEFAULTS no longer listens on 127.0.0.1:8475 (DDUMP_WORKER_OPTS=$opts): update this test" ;;
esac
# The unit's own ExecStart, with systemd's `$$` (a literal `$`) turned back into `$`.
execstart=$(sed -n 's/^ExecStart=//p' "$UNIT")
[ -n "$execstart" ] || die "no ExecStart= in $UNIT"
eval "set -- ${execstart//\$\$/\$}"

# unit_sandbox.py adds the unit's SystemCallFilter=, RestrictAddressFamilies= and
# MemoryDenyWriteExecute=; copied where user nobody can read it.
install -m 0644 "$repo/packaging/unit_sandbox.py" "$work/unit_sandbox.py"
sandbox='mount -t proc -o subset=pid,hidepid=invisible proc /proc && mount -o remount,bind,ro / && exec "$@"'

say "starting the worker: $* (DDUMP_WORKER_OPTS=$opts)"
(
    cd /
    umask 0077
    exec timeout -s TERM 300 unshare --mount --propagation private -- /bin/sh -c "$sandbox" sandbox \
        setpriv --reuid=nobody --regid=nogroup --clear-groups --no-new-privs \
        --inh-caps=-all,+net_raw --ambient-caps=-all,+net_raw --bounding-set=-all,+net_raw \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/ LANG=C.UTF-8 \
        DDUMP_WORKER_OPTS="$opts" /usr/bin/python3 "$work/unit_sandbox.py" "$UNIT" -- "$@"
) >"$work/worker.log" 2>&1 &
pids+=($!)
worker_timeout=$!  # the `timeout` wrapper; its only child becomes the worker

ok=0
for _ in $(seq 50); do
    # Any answer ends the wait: a 503 (the sandbox keeps tcpdump from capturing) says why.
    code=$(curl -sS --max-time 2 -o "$work/health.json" -w '%{http_code}' "http://127.0.0.1:$port/health" 2>/dev/null) || true
    if [ "$code" = 200 ] || [ "$code" = 503 ]; then
        ok=1
        break
    fi
    kill -0 "$worker_timeout" 2>/dev/null || die "the worker exited at start"
    sleep 0.2
done
[ "$ok" = 1 ] || die "no answer on http://127.0.0.1:$port/health within 10 s"
python3 -c 'import json, sys; h = json.load(open(sys.argv[1])); assert h["status"] == "ok", h; assert h["exposed"] is False, h; print("deb-test: health:", h, file=sys.stderr)' \
    "$work/health.json" || die "bad /health answer: $(cat "$work/health.json")"
# A bad filter gets tcpdump's message alone: nothing the sandbox made tcpdump say on the way.
code=$(curl -sS --max-time 10 -o "$work/bad.txt" -w '%{http_code}' "http://127.0.0.1:$port/capture?filter=tcp+port+99999")
[ "$code" = 400 ] || die "a bad filter got HTTP $code, want 400: $(cat "$work/bad.txt")"
grep -qi 'warning' "$work/bad.txt" && die "the 400 message has a warning in it: $(cat "$work/bad.txt")"

# timeout's child is the worker itself: unshare, sh, setpriv, env, unit_sandbox.py and the
# unit's sh all exec the next one.
worker=$(pgrep -P "$worker_timeout" | head -n 1)
grep -q ddump-worker "/proc/$worker/cmdline" || die "pid $worker is not the worker: $(tr '\0' ' ' <"/proc/$worker/cmdline")"
status=$(cat "/proc/$worker/status")
grep -Eq '^Uid:\s+65534\s' <<<"$status" || die "the worker does not run as nobody"
for set in CapEff CapBnd CapAmb; do
    grep -Eq "^$set:\s+0000000000002000$" <<<"$status" || die "worker $set is not CAP_NET_RAW alone: $(grep "^$set" <<<"$status")"
done

# Traffic for the captures: ping until the end of the test, far more than 3 packets.
ping -q -i 0.2 -w 120 127.0.0.1 >/dev/null 2>&1 &
pids+=($!)

count_packets() { # file.pcap -> number of packets tcpdump reads back
    timeout 10 tcpdump -nn -r "$1" 2>/dev/null | wc -l
}

say "capturing through curl"
timeout 30 curl -fsSN --max-time 25 -D "$work/curl.headers" -o "$work/curl.pcap" \
    "http://127.0.0.1:$port/capture?filter=icmp&count=3" || die "curl capture failed: $(cat "$work/curl.headers" 2>/dev/null)"
grep -qi '^content-type: application/vnd.tcpdump.pcap' "$work/curl.headers" || die "not a pcap response"
n=$(count_packets "$work/curl.pcap")
[ "$n" = 3 ] || die "curl capture: tcpdump -r read $n packets, want 3"

say "asking a running capture for tcpdump's counts (SIGUSR1 under the unit's sandbox)"
timeout 30 curl -fsSN --max-time 25 -D "$work/running.headers" -o /dev/null \
    "http://127.0.0.1:$port/capture?filter=icmp&duration=3" &
pids+=($!)
capture_id=""
for _ in $(seq 50); do
    capture_id=$(sed -n 's/^x-ddump-capture: *\([A-Za-z0-9_-]*\).*/\1/Ip' "$work/running.headers" 2>/dev/null || true)
    [ -n "$capture_id" ] && break
    sleep 0.1
done
[ -n "$capture_id" ] || die "no X-Ddump-Capture header: $(cat "$work/running.headers" 2>/dev/null)"
sleep 1
curl -fsS --max-time 10 "http://127.0.0.1:$port/capture/stats?id=$capture_id" >"$work/stats.json" ||
    die "GET /capture/stats failed"
python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); assert s["running"] is True and s["captured"] >= 1 and s["dropped_by_kernel"] == 0, s' \
    "$work/stats.json" || die "bad /capture/stats answer: $(cat "$work/stats.json")"

if env -i PATH="$PATH" /usr/bin/ddump --help >/dev/null 2>&1; then
    say "capturing through the installed ddump CLI"
    env -i PATH="$PATH" LANG=C.UTF-8 timeout 30 /usr/bin/ddump "http://127.0.0.1:$port/capture?filter=icmp&count=3" -c 3 \
        >"$work/cli.pcap" 2>"$work/cli.err" || die "ddump failed: $(cat "$work/cli.err")"
    n=$(count_packets "$work/cli.pcap")
    [ "$n" = 3 ] || die "ddump capture: tcpdump -r read $n packets, want 3 ($(cat "$work/cli.err"))"
    grep -q "0 dropped by the kernel" "$work/cli.err" || die "no drop count in the summary: $(cat "$work/cli.err")"
else
    die "the installed ddump --help fails"
fi

# Captures are over: no tcpdump may be left behind.
for _ in $(seq 25); do
    [ -z "$(pgrep -P "$worker" || true)" ] && break
    sleep 0.2
done
[ -z "$(pgrep -P "$worker" || true)" ] || die "tcpdump still running after the captures: $(pgrep -a -P "$worker")"

say "stopping the worker"
kill -TERM "$worker"
for _ in $(seq 50); do
    kill -0 "$worker" 2>/dev/null || break
    sleep 0.2
done
kill -0 "$worker" 2>/dev/null && die "the worker did not stop within 10 s of SIGTERM"

# --- purge -------------------------------------------------------------------------------------
say "purging"
timeout 120 dpkg --purge ddump >"$work/purge.log" 2>&1 || { cat "$work/purge.log" >&2; die "dpkg --purge ddump"; }
installed_by_us=0
left=()
for f in /usr/bin/ddump /usr/bin/ddump-worker /usr/bin/ddump-extcap "$extcap" \
    /lib/systemd/system/ddump-worker.service \
    /usr/lib/systemd/system/ddump-worker.service /etc/default/ddump-worker \
    /etc/systemd/system/multi-user.target.wants/ddump-worker.service \
    /usr/lib/python3/dist-packages/ddump /usr/share/doc/ddump \
    /usr/share/man/man1/ddump.1.gz /usr/share/man/man1/ddump-worker.1.gz \
    /usr/share/man/man1/ddump-extcap.1.gz; do
    if [ -e "$f" ] || [ -L "$f" ]; then left+=("$f"); fi
done
# deb-systemd-helper's record of the enablement (postinst made it, even without systemd running).
for f in /var/lib/systemd/deb-systemd-helper-enabled/ddump-worker.service* \
    /var/lib/systemd/deb-systemd-helper-enabled/*/ddump-worker.service \
    /var/lib/systemd/deb-systemd-helper-masked/ddump-worker.service; do
    if [ -e "$f" ] || [ -L "$f" ]; then left+=("$f"); fi
done
[ "${#left[@]}" = 0 ] || die "left after purge: ${left[*]}"
dpkg-query -W -f='${Status}' ddump 2>/dev/null | grep -q installed && die "ddump still known to dpkg"

say "worker log:"
sed 's/^/    /' "$work/worker.log" >&2
say "OK: built, installed, captured 3 + 3 packets as nobody with CAP_NET_RAW only, purged clean"
