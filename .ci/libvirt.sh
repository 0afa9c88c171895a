#!/usr/bin/env bash
# Starts (up) and stops (down) libvirtd and virtlogd for the tests, as root, on a machine without systemd.
# Installs nothing: scripts/install.sh installs libvirt-daemon-system. Idempotent.
#   .ci/libvirt.sh up        configure qemu.conf and libvirtd.conf (group libvirt may use it, as
#                            scripts/libvirtd-access.sh sets it), start virtlogd and libvirtd if not running,
#                            wait for them
#   .ci/libvirt.sh down      stop the daemons this script started (a daemon it found running is left alone)
#   .ci/libvirt.sh restart   stop libvirtd (whoever started it) and start it again; tests use it
set -euo pipefail

QEMU_CONF=/etc/libvirt/qemu.conf
URI=qemu:///system
STATE=/run/vjobs-ci-libvirt  # one file per daemon this script started: `down` stops only those
WAIT_S=30

running() {  # running NAME: the pidfile names a live process
    local pidfile=/run/$1.pid
    [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# QEMU must run as root here: as libvirt-qemu it cannot open /dev/kvm (0600 root), and libvirt then
# re-probes the QEMU binary at every domain start ("KVM was enabled when probing, but it is not available
# now"), which made each start take about 68 s.
configure_qemu() {
    local key
    for key in user group; do
        grep -qx "$key = \"root\"" "$QEMU_CONF" && continue
        sed -i -E "/^[[:space:]]*$key[[:space:]]*=/d" "$QEMU_CONF"
        echo "$key = \"root\"" >>"$QEMU_CONF"
        configured=1
    done
}

start() {  # start NAME: virtlogd or libvirtd, in the background; they write /run/NAME.pid themselves
    running "$1" && return 0
    if [[ $1 == libvirtd ]]; then
        # libvirtd daemonises each QEMU, which then belongs to the nearest child subreaper, or PID 1. PID 1
        # on these machines is not an init that reaps promptly: every domain's QEMU stayed a zombie for
        # about 1.6 s and libvirt waited for it at each destroy. tini -s makes a reaping subreaper of ours.
        setsid tini -s -- libvirtd </dev/null >/dev/null 2>&1 &
    else
        "$1" -d
    fi
    mkdir -p "$STATE" && touch "$STATE/$1"
}

stop() {  # stop NAME: SIGTERM, then wait (bounded) for it to go
    local pidfile=/run/$1.pid pid
    running "$1" || { rm -f "$STATE/$1"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 1 $((WAIT_S * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$STATE/$1"
}

wait_for_libvirtd() {
    for _ in $(seq 1 $((WAIT_S * 10))); do
        virsh -c "$URI" version >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "libvirt.sh: libvirtd did not answer at $URI within $WAIT_S s" >&2
    virsh -c "$URI" version >&2 || true
    return 1
}

case "${1:-}" in
    up)
        configured=0
        configure_qemu
        [[ -n $("$(dirname "$0")/../scripts/libvirtd-access.sh") ]] && configured=1
        # a libvirtd that was running before the change still has the old settings
        ((configured)) && running libvirtd && stop libvirtd
        start virtlogd
        start libvirtd
        wait_for_libvirtd
        ;;
    down)
        for daemon in libvirtd virtlogd; do
            [[ -e $STATE/$daemon ]] && stop "$daemon"
        done
        true
        ;;
    restart)
        stop libvirtd
        start virtlogd
        start libvirtd
        wait_for_libvirtd
        ;;
    *)
        echo "usage: $0 up|down|restart" >&2
        exit 2
        ;;
esac
