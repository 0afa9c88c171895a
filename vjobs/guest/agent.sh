#!/bin/busybox sh
# vjobs guest agent: /init of the built-in initramfs. It runs one job and powers off.
#
# The host gives it disks whose names and order it does not rely on (vd*, xvd*, sd* all work):
#   io       starts with a tar whose first member is VJOBS-IO-DISK: the job (command, env, outputs, settings)
#            and the identities of the other disks. The results are written back onto this same disk.
#   scratch  ext4: /work is the job's working directory (its inputs), /vjobs holds stdout and stderr.
#   release  squashfs or erofs, attached read-only, mounted read-only at the job's release mount point.
# Every disk but io is recognised by the sha256 of its first 64 KiB, which the host wrote into the job.
#
# Results: one tar stream written straight onto the raw io device, so the host reads it without mounting
# anything: vjobs/status (key=value lines), vjobs/stdout, vjobs/stderr, then work/<each output>.
# If that stream would not fit on the device, only vjobs/status (error=output_too_large) and the tails of
# stdout and stderr are written: a clear error instead of a silently cut archive.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /run /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "vjobs-agent: $*" > /dev/console; }
finish() { sync; poweroff -f; reboot -f; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

say up
booted=$(uptime_s)
if grep -q 'vjobs.probe' /proc/cmdline; then
    say "probe ok kernel=$(uname -r) uptime=$booted"
    finish
fi

while read -r module; do
    insmod "/lib/modules/$module" 2>/dev/null
done < /etc/vjobs/modules

# Disks appear asynchronously after the block drivers load: wait for them, with a bound.
block_devices() {
    for path in /sys/block/vd* /sys/block/xvd* /sys/block/sd*; do
        [ -e "$path" ] && echo "/dev/${path##*/}"
    done
}
find_io_disk() {
    for device in $(block_devices); do
        [ "$(head -c 13 "$device" 2>/dev/null)" = "VJOBS-IO-DISK" ] && { echo "$device"; return 0; }
    done
    return 1
}
io=""
tries=0
while [ -z "$io" ] && [ $tries -lt 200 ]; do
    io=$(find_io_disk) || { sleep 0.05; tries=$((tries + 1)); }
done
if [ -z "$io" ]; then
    say "error: no io disk found among: $(block_devices | tr '\n' ' ')"
    finish
fi

mkdir -p /run/vjobs
tar -xf "$io" -C /run/vjobs || { say "error: cannot read the job from $io"; finish; }
job=/run/vjobs/job
. "$job/settings"
IO_DISK_BYTES=$(blockdev --getsize64 "$io")

status=/run/vjobs/status
record() { echo "$1=$2" >> "$status"; }
: > "$status"
record agent_version 1
record booted_s "$booted"

newline='
'
# Writes a tar of the paths in /run/vjobs/list (relative to /scratch) to $1. busybox tar has no -T, so the
# list becomes arguments: one per line, no word splitting on spaces, no globbing.
tar_list() {
    target=$1
    set -f
    IFS=$newline
    set -- $(cat /run/vjobs/list)
    unset IFS
    set +f
    tar -cf "$target" -C /scratch "$@"
}

# Writes the results onto the io disk and powers off; $1 is an error code or empty.
deliver() {
    [ -n "$1" ] && record error "$1"
    mkdir -p /scratch/vjobs
    cp "$status" /scratch/vjobs/status
    echo vjobs/status > /run/vjobs/list
    for stream in stdout stderr; do
        [ -f "/scratch/vjobs/$stream" ] && echo "vjobs/$stream" >> /run/vjobs/list
    done
    [ -f /run/vjobs/outputs ] && cat /run/vjobs/outputs >> /run/vjobs/list
    size=$(tar_list - 2>/dev/null | wc -c)
    if [ "$size" -gt "$IO_DISK_BYTES" ]; then
        record error output_too_large
        record output_bytes "$size"
        record output_limit_bytes "$IO_DISK_BYTES"
        cp "$status" /scratch/vjobs/status
        for stream in stdout stderr; do
            [ -f "/scratch/vjobs/$stream" ] && tail -c 65536 "/scratch/vjobs/$stream" > "/scratch/vjobs/$stream.tail" \
                && mv "/scratch/vjobs/$stream.tail" "/scratch/vjobs/$stream"
        done
        printf 'vjobs/status\nvjobs/stdout\nvjobs/stderr\n' > /run/vjobs/list
        say "error: outputs are $size bytes, more than the $IO_DISK_BYTES the output disk holds"
    fi
    tar_list "$io" || say "error: writing results to $io failed"
    sync
    say "results written to $io"
    finish
}

# Any other disk is found by the hash of its head, as the host recorded it.
find_disk() {
    for device in $(block_devices); do
        [ "$(head -c 65536 "$device" 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$1" ] && {
            echo "$device"; return 0; }
    done
    return 1
}
wait_disk() {
    tries=0
    while [ $tries -lt 100 ]; do
        find_disk "$1" && return 0
        sleep 0.05
        tries=$((tries + 1))
    done
    return 1
}

mkdir -p /scratch
scratch=$(wait_disk "$SCRATCH_HEAD") || { say "error: scratch disk not found"; finish; }
mount -t ext4 "$scratch" /scratch || { say "error: cannot mount the scratch disk $scratch"; finish; }
mkdir -p /scratch/vjobs /scratch/work

if [ -n "$RELEASE_HEAD" ]; then
    release=$(wait_disk "$RELEASE_HEAD") || deliver release_disk_missing
    mkdir -p "$RELEASE_MOUNT"
    mount -t "$RELEASE_FSTYPE" -o ro "$release" "$RELEASE_MOUNT" || deliver release_mount_failed
fi

# The job's network, only when it asked (the host attaches no interface otherwise): DHCP from the
# hypervisor's side (QEMU's user-mode stack, or the libvirt network), with a bound.
first_interface() {
    for path in /sys/class/net/*; do
        [ "${path##*/}" != lo ] && [ -e "$path" ] && { echo "${path##*/}"; return 0; }
    done
    return 1
}
start_network() {
    tries=0
    while ! interface=$(first_interface) && [ $tries -lt 100 ]; do
        sleep 0.05
        tries=$((tries + 1))
    done
    if [ -z "$interface" ]; then
        say "error: the job asked for a network but the VM has no network interface"
        record network no_interface
        return
    fi
    cat > /run/vjobs/dhcp.sh <<'SCRIPT'
#!/bin/sh
case "$1" in
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        ;;
esac
SCRIPT
    chmod +x /run/vjobs/dhcp.sh
    ip link set "$interface" up
    if udhcpc -i "$interface" -s /run/vjobs/dhcp.sh -q -n -t 10 -T 1 > /dev/null 2>&1; then
        say "network: $interface $(ip -4 -o addr show "$interface" | awk '{print $4}')"
        record network "$interface"
    else
        say "error: no DHCP answer on $interface within 10 s"
        record network dhcp_failed
    fi
}
ip link set lo up 2>/dev/null
[ -n "$NETWORK" ] && start_network

cd /scratch/work
record started_s "$(uptime_s)"
say "running the payload"
(
    . "$job/env.sh"
    exec sh "$job/command.sh"
) < /dev/null > /scratch/vjobs/stdout 2> /scratch/vjobs/stderr
record exit_code $?
record ended_s "$(uptime_s)"
cd /scratch/work

# Outputs: shell globs relative to the working directory, one per line; a matched folder comes back whole.
: > /run/vjobs/outputs
while IFS= read -r pattern; do
    IFS=$newline
    for match in $pattern; do
        if [ -e "$match" ] || [ -L "$match" ]; then
            echo "work/${match#./}" >> /run/vjobs/outputs
        fi
    done
    unset IFS
done < "$job/outputs"
sort -u /run/vjobs/outputs -o /run/vjobs/outputs
cd /
deliver ""
