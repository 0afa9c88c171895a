#!/bin/sh
# dom0's PID 1 (vjobs.testing.xen_node): no systemd, no udev; set up what Xen's tools and the XAPI stand-in
# need, start Xen's daemons, then run the stand-in in the foreground. Whatever goes wrong powers the VM off,
# so that the host sees QEMU exit at once instead of waiting for its deadline.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "vjobs-dom0: $*"; }
fail() { say "$*: powering off"; busybox poweroff -f; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
# Without udev nothing makes these, and Xen's locking.sh then spins in claim_lock on /dev/stdin|/dev/fd:
# the block hot-plug never finishes and libxl gives up after 40 s ("unable to add disk devices").
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /run/xen /var/log/xen/console

for module in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback loop \
    9p 9pnet_virtio virtio_net; do
    modprobe "$module" || say "cannot load $module"
done
grep -q xenfs /proc/filesystems && ! mountpoint -q /proc/xen && mount -t xenfs xenfs /proc/xen

# The host's /tmp and /var/tmp at the same paths (the xen driver hands XAPI kernels and initramfs images in
# vjobs' work folders by path), vjobs' code, and the SR: read-only but the SR.
share() { mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro "$1" "$2" || fail "cannot mount $1 at $2"; }
share tmp /tmp
share vartmp /var/tmp
mkdir -p /opt/vjobs-code /srv/xapi
share code /opt/vjobs-code
mount -t ext4 /dev/vdb /srv/xapi || fail "cannot mount the SR disk /dev/vdb"

ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up || fail "no network"

/etc/init.d/xen start || fail "Xen's daemons did not start"
xl info | grep -E '^(xen_version|total_memory|free_memory)'

say "starting the XAPI stand-in"
cd /opt/vjobs-code
PYTHONDONTWRITEBYTECODE=1 python3 -m vjobs.testing.xapi_standin --runner xl \
    --listen 0.0.0.0:8080 --state-dir /srv/xapi --password-file /opt/vjobs-code/xapi-password \
    --sr-size-mib 14000 2>&1
fail "the XAPI stand-in exited with status $?"
