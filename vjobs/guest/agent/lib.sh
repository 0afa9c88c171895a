# Helpers shared by the agent's stages. Sourced by /init; POSIX sh as busybox runs it.

say() { echo "vjobs-agent: $*" > /dev/console; }
on_cmdline() { case " $cmdline " in *" $1 "*) return 0 ;; esac; return 1; }  # $cmdline: 10-boot.sh reads it
finish() { sync; poweroff -f; reboot -f; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

status=/run/vjobs/status
TEMPLATE_WAIT_S=600  # a template that is not saved within this (its host died) powers off
record() { echo "$1=$2" >> "$status"; }

newline='
'

# The channel to the host (vjobs/guest/streams.py), when the VM has one (find_host_channel): records to the
# host on descriptor 4, lines from it on descriptor 5 (open_host_channel). The agent writes framed records
# "<kind> <length>\n<bytes>":
#   1, 2  what the payload added to its stdout and stderr, every second (64 KiB at most a record);
#   3     a sync round: a tar of what changed in the outputs and read-write binds (sync_round);
#   4     a usage sample: "name=value" lines (usage_figures), every SYNC_INTERVAL_S with the sync.
# The host may write one line back: "sync" asks for a round now (it is about to stop the VM). The payload
# writes its files as before (they are the final copy), so a host that reads slowly or not at all holds up
# this loop only, never the payload. Ends when the agent asks it to (stop_serving).
# The channel is a virtio-serial port named vjobs.streams (qemu_user, kvm), or, when the kernel command line
# says vjobs.streams=console (xen: XAPI gives a guest its console and no other channel), the console itself.
find_host_channel() {  # sets $channel (no fork: it runs before every payload)
    on_cmdline vjobs.streams=console && { channel=console; return 0; }
    for name in /sys/class/virtio-ports/*/name; do
        read -r port < "$name" 2>/dev/null && [ "$port" = vjobs.streams ] || continue
        port=${name%/name}
        channel=/dev/${port##*/}
        return 0
    done
    return 1
}
open_host_channel() {
    [ -n "$LIVE_CHANNEL" ] && find_host_channel || return 1
    if [ "$channel" != console ]; then
        exec 4<> "$channel" 5<&4
        return
    fi
    # On the console, records go through console_carrier (one write each, so no line of the agent's falls
    # inside one) and the host's lines come as typed on it, not echoed back.
    mkfifo /run/vjobs/channel || return 1
    console_carrier < /run/vjobs/channel > /dev/console &
    stty -echo < /dev/console 2>/dev/null
    exec 4> /run/vjobs/channel 5< /dev/console
}

# The records on the console (vjobs/guest/streams.py StreamsOnConsole): what comes in on stdin, as it comes,
# in pieces of at most 3072 bytes, each written in base64 inside an escape sequence, ESC ]vjobs-streams; ...
# BEL, which the host takes out of the console log. One echo, one write() (printf writes 4 KiB at a time).
console_carrier() {
    carrier_start=$(printf '\033]vjobs-streams;') carrier_end=$(printf '\007')
    while piece=$(dd bs=3072 count=1 2>/dev/null | base64 -w 0) && [ -n "$piece" ]; do
        echo -n "$carrier_start$piece$carrier_end"
    done
}

serve_host_channel() {
    open_host_channel || return 0
    out=0 err=0 request="" listening=1 interval=${SYNC_INTERVAL_S:-0}
    read -r up _ < /proc/uptime
    next_round=$((${up%.*} + interval))
    while [ ! -e /run/vjobs/streams.stop ]; do
        send_new 1 /scratch/vjobs/stdout "$out" && out=$sent
        send_new 2 /scratch/vjobs/stderr "$err" && err=$sent
        read -r up _ < /proc/uptime
        if [ "$request" = sync ] || { [ "$interval" -gt 0 ] && [ "${up%.*}" -ge "$next_round" ]; }; then
            send_usage
            sync_round "$request"
            read -r up _ < /proc/uptime
            next_round=$((${up%.*} + interval))
        fi
        wait_for_host
    done
}

# Up to a second for a line from the host ($request). A read that fails at once means nobody can write to
# the port: from then on the loop just sleeps.
wait_for_host() {
    request=""
    if [ "$listening" = 1 ]; then
        read -r before _ < /proc/uptime
        read -r -t 1 request <&5 && return 0
        read -r after _ < /proc/uptime
        [ "$(centiseconds "$after")" -lt $(($(centiseconds "$before") + 50)) ] || return 0
        listening=0
    fi
    sleep 1
}
centiseconds() { echo $((${1%.*} * 100 + 1${1#*.} - 100)); }  # "12.34" (two decimals, as /proc/uptime): 1234

# Sends what file $2 holds past byte $3 as records of kind $1 (64 KiB at most each) on descriptor 4; leaves
# the offset reached in $sent.
send_new() {
    sent=$3
    size=$(stat -c %s "$2" 2>/dev/null) || return 1
    while [ "$size" -gt "$sent" ]; do
        length=$((size - sent))
        [ "$length" -gt 65536 ] && length=65536
        { printf '%s %s\n' "$1" "$length"; tail -c +$((sent + 1)) "$2" | head -c "$length"; } >&4 || return 1
        sent=$((sent + length))
    done
}

send_usage() {
    usage_figures live > /run/vjobs/usage.sample && [ -s /run/vjobs/usage.sample ] || return 0
    { printf '4 %s\n' "$(stat -c %s /run/vjobs/usage.sample)"; cat /run/vjobs/usage.sample; } >&4
}

# What a sync round looks at, relative to /scratch: work/<each match of the outputs>, binds/<each
# read-write bind>.
sync_roots() {
    match_outputs
    while read -r number target; do
        [ -n "$target" ] && echo "binds/$number"
    done < "$job/rw_binds"
}

# Every regular file under the sync roots, "size mtime path" (path relative to /scratch), into $1; leaves
# in $scan_start and $scan_end the clock's whole seconds around the scan.
scan_files() {
    listing=$1 was=$PWD
    cd /scratch || return 1
    sync_roots > /run/vjobs/sync.roots
    scan_start=$(date +%s)
    set -f
    IFS=$newline
    set -- $(cat /run/vjobs/sync.roots)
    unset IFS
    set +f
    : > "$listing.new"
    [ $# -gt 0 ] && find "$@" -type f -exec stat -c '%s %Y %n' {} + >> "$listing.new" 2>/dev/null
    mv "$listing.new" "$listing"
    scan_end=$(date +%s)
    cd "$was"
}

# The state the payload starts from: what a round sends is what differs from it, or from the last round.
start_sync() {
    scan_files /run/vjobs/sync.sent
    sent_start=$scan_start sent_end=$scan_end
}

# A sync round: the files that are new or changed since the last round (by size and mtime; and any whose
# mtime falls in the seconds of the last scan, which a second change within that second would not move)
# go to the host as one tar, record "3 <length>\n<tar>". Its first member, vjobs/sync, lists every file
# present, so that the host removes what is gone. The tar is written onto the io disk first, which holds
# nothing until the results, so that its length is known before it is sent and the scratch disk the
# payload writes to is not used; stop_serving waits for such a write to end (/run/vjobs/io.busy) before it
# writes the results there. A round that fails (a file shrank under tar, the host left) is sent again.
# A round with nothing new or gone is not sent, unless the host asked for it ($1 = sync): it waits for one.
sync_round() {
    scan_files /run/vjobs/sync.now || return 0
    awk -v from="$sent_start" -v to="$sent_end" '
        FILENAME == ARGV[1] { sent[$0] = 1; count++; next }
        { present++ }
        !($0 in sent) || ($2 >= from && $2 <= to) { sub(/^[0-9]+ [0-9]+ /, ""); print > "/run/vjobs/sync.list" }
        END { if (present == count) exit 1 }' /run/vjobs/sync.sent /run/vjobs/sync.now 2>/dev/null
    gone=$?
    [ -s /run/vjobs/sync.list ] || [ "$gone" = 0 ] || [ "$1" = sync ] || return 0
    sed 's/^[0-9]* [0-9]* //' /run/vjobs/sync.now > /scratch/vjobs/sync
    { echo vjobs/sync; cat /run/vjobs/sync.list 2>/dev/null; } > /run/vjobs/sync.members
    rm -f /run/vjobs/sync.list
    : > /run/vjobs/io.busy
    [ -e /run/vjobs/streams.stop ] && { rm -f /run/vjobs/io.busy; return 0; }
    size=$( { tar_list - /run/vjobs/sync.members || echo 0 > /run/vjobs/sync.failed; } 2>/dev/null | tee "$io" | wc -c)
    rm -f /run/vjobs/io.busy
    if [ -e /run/vjobs/sync.failed ] || [ "$size" -gt "$IO_DISK_BYTES" ]; then
        rm -f /run/vjobs/sync.failed
        return 0
    fi
    { printf '3 %s\n' "$size"; head -c "$size" "$io"; } >&4 || return 0
    mv /run/vjobs/sync.now /run/vjobs/sync.sent
    sent_start=$scan_start sent_end=$scan_end
}

# Asks the channel's loop ($streamer) to end, and waits for a sync round's write onto the io disk.
stop_serving() {
    : > /run/vjobs/streams.stop
    while [ -e /run/vjobs/io.busy ]; do
        sleep 0.05
    done
    kill "$1" 2>/dev/null
}

# The wall time, counted from the agent's start as the host counts it from the "up" marker: SIGTERM to the
# payload's namespace (its PID 1 passes it on to every process), STOP_GRACE_S to write what it can, then
# SIGKILL. The outputs are collected after that as after any end, and the status says timed_out.
#   $1: the unshare process that started the namespace
watch_wall_time() {
    left=$(awk -v booted="$booted" -v wall="$WALLTIME_S" -v now="$(uptime_s)" \
        'BEGIN { left = booted + wall - now; printf "%.3f", (left > 0 ? left : 0) }')
    sleep "$left"
    init=$(children_of "$1") || return 0  # the payload ended just now, on its own
    record timed_out 1
    say "wall time of $WALLTIME_S s reached: SIGTERM to the payload, SIGKILL after $STOP_GRACE_S s"
    kill -s TERM "$init"
    sleep "$STOP_GRACE_S"
    kill -s KILL "$init" 2>/dev/null
}

children_of() {
    found=1
    for stat in /proc/[0-9]*/stat; do
        { read -r pid _ _ parent _ < "$stat"; } 2>/dev/null || continue  # it may end while we look
        [ "$parent" = "$1" ] && { echo "$pid"; found=0; }
    done
    return $found
}

# The module groups (guest/image.py's MODULE_ROOTS) this VM's devices need. Its virtio devices on a PCI bus
# say it, read from sysfs with builtins (no fork per device): the disk drivers always, the SCSI drivers
# for a virtio-scsi controller (templates), the network driver for a network card. A VM with no virtio
# device on PCI (microvm's virtio-mmio, a Xen PV guest, anything unforeseen) gets every module. Sets
# $groups (no subshell: a fork).
module_groups() {
    groups=""
    for device in /sys/bus/pci/devices/*; do
        { read -r vendor < "$device/vendor" && read -r id < "$device/device"; } 2>/dev/null || continue
        [ "$vendor" = 0x1af4 ] || continue
        case "$id" in  # virtio PCI ids: transitional 0x10XX, modern 0x1040 + the virtio device id
            0x1000|0x1041) groups="$groups net" ;;
            0x1004|0x1048) groups="$groups scsi" ;;
            0x1003|0x1043) groups="$groups serial" ;;
        esac
        case "$groups" in *pci*) ;; *) groups="$groups pci disk" ;; esac
    done
    groups=${groups:-all}
}

# Loads, in the file's order (each module after its dependencies), the modules of the groups in $1
# ("all": every one).
load_modules() {
    while read -r module needed_by; do
        for group in $needed_by; do
            case " $1 " in *" $group "*|*" all "*) insmod "/lib/modules/$module" 2>/dev/null; break ;; esac
        done
    done < /etc/vjobs/modules
}

# Before a template is saved: free memory still holds what the boot left there (the initramfs archive, the
# kernel's unpacking), and the host would save it and write it back into every job's VM. One process that
# fills free memory with zero pages and exits leaves those pages zero: QEMU saves a zero page as a flag and
# a restore does not touch it, so the state is 15-30 % smaller and restores faster, and no job pays for it
# (the kernel's init_on_free=1 would zero at every free: +25 % CPU for a payload that allocates). The
# memory is dd's own buffer, not a tmpfs file: should the kernel run short, it ends dd and gets it all back.
# The leftovers are scattered (half a 512 MiB guest's free memory saved less than half as much as all of
# it), so the fill is whole up to ZERO_MOST_MIB: under TCG zeros cost ~4 s a GiB, once per template, and a
# 16 GiB guest's template is not worth a minute more (and one read() stops at 2 GiB).
# Free memory left unfilled: 8 MiB and 4 % of the memory, above the kernel's reserves and dd's page tables
# (with 2 %, a 2 GiB guest's dd met the OOM killer: harmless, it gives all back, but it is in the log).
ZERO_MARGIN_MIB=8
ZERO_MOST_MIB=2040
zero_free_memory() {
    fill=$(awk -v margin=$ZERO_MARGIN_MIB -v most=$ZERO_MOST_MIB '
        /^MemTotal:/ { total = $2 / 1024 } /^MemFree:/ { free = $2 / 1024 }
        END { m = int(free - margin - total / 25); if (m > most) m = most; print (m > 0 ? m : 0) }' /proc/meminfo)
    [ "$fill" -gt 0 ] && dd if=/dev/zero of=/dev/null bs="${fill}M" count=1 2>/dev/null
    return 0
}

block_devices() {
    for path in /sys/block/vd* /sys/block/xvd* /sys/block/sd*; do
        [ -e "$path" ] && echo "/dev/${path##*/}"
    done
}

# The io disk starts with VJOBS-IO-DISK; sets $io. No subshell and no child process per device: under TCG
# each fork costs milliseconds, and this runs in a loop while disks appear.
find_io_disk() {
    for path in /sys/block/vd* /sys/block/xvd* /sys/block/sd*; do
        [ -e "$path" ] || continue
        magic=""
        read -r -n 13 magic < "/dev/${path##*/}" 2>/dev/null
        [ "$magic" = VJOBS-IO-DISK ] && { io=/dev/${path##*/}; return 0; }
    done
    return 1
}

# Waits up to $1 s for the io disk: disks appear asynchronously after the block drivers load, or when
# the host hot-plugs them into a restored template.
wait_for_io_disk() {
    polls=$(($1 * 100))
    while ! find_io_disk; do
        [ $polls -gt 0 ] || return 1
        polls=$((polls - 1))
        sleep 0.01
    done
}

# Any disk but io is found by the sha256 of its first 64 KiB, as the host recorded it; sets $disk. Each
# device is hashed once, into $heads ("sha256 device" lines).
heads=""
find_disk() {
    for path in /sys/block/vd* /sys/block/xvd* /sys/block/sd*; do
        device=/dev/${path##*/}
        [ -e "$path" ] && [ "$device" != "$io" ] || continue
        case "$heads" in *" $device$newline"*) continue ;; esac
        sum=$(head -c 65536 "$device" 2>/dev/null | sha256sum)
        heads="$heads${sum%% *} $device$newline"
    done
    disk=""
    IFS=$newline
    for line in $heads; do
        [ "${line%% *}" = "$1" ] && disk=${line#* }
    done
    unset IFS
    [ -n "$disk" ]
}

# Disks appear asynchronously after the block drivers load: wait for them, with a bound; sets $disk.
wait_disk() {
    tries=0
    while ! find_disk "$1"; do
        [ $tries -lt 100 ] || return 1
        sleep 0.05
        tries=$((tries + 1))
    done
}

# Waits (bounded) for a device node, e.g. a partition the kernel is still scanning.
wait_node() {
    tries=0
    while [ ! -b "$1" ] && [ $tries -lt 100 ]; do
        sleep 0.05
        tries=$((tries + 1))
    done
    [ -b "$1" ]
}

# Writes a tar of the paths listed in $2 (default /run/vjobs/list; relative to /scratch) to $1. busybox tar
# has no -T, so the list becomes arguments: one per line, no word splitting on spaces, no globbing.
tar_list() {
    target=$1
    set -f
    IFS=$newline
    set -- $(cat "${2:-/run/vjobs/list}")
    unset IFS
    set +f
    tar -cf "$target" -C /scratch "$@"
}

# The outputs: shell globs relative to the working directory, one per line; prints "work/<match>" for each
# match (a matched folder comes back whole).
match_outputs() {
    (
        cd /scratch/work || exit 0
        while IFS= read -r pattern; do
            IFS=$newline
            for match in $pattern; do
                if [ -e "$match" ] || [ -L "$match" ]; then
                    echo "work/${match#./}"
                fi
            done
            unset IFS
        done < "$job/outputs"
    )
}

# Writes the results onto the io disk and powers off; $1 is an error code or empty. If the results would
# not fit on the device, only vjobs/status (error=output_too_large) and the tails of stdout and stderr are
# written: a clear error instead of a silently cut archive.
# The payload's own cgroup (v2): what it used is read from there when it ends (vjobs/guest/collect.py
# parses the figures, trusting none of them). Without cgroup v2 in the guest kernel the job runs unmeasured.
payload_cgroup=/sys/fs/cgroup/vjobs-payload
make_payload_cgroup() {
    [ -f /sys/fs/cgroup/cgroup.controllers ] || mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || return 0
    for controller in cpu memory pids io; do
        echo "+$controller" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
    done
    mkdir -p "$payload_cgroup" 2>/dev/null
}
cgroup_value() {  # file, key ("" for a file holding one number): the number, or nothing
    [ -f "$payload_cgroup/$1" ] || return 0
    if [ -z "$2" ]; then head -n1 "$payload_cgroup/$1"; else awk -v k="$2" '$1 == k { print $2 }' "$payload_cgroup/$1"; fi
}
# The figures, "name=value" lines; with "live", also what the payload holds now (memory, processes).
usage_figures() {
    [ -f "$payload_cgroup/cgroup.procs" ] || return 0
    user=$(cgroup_value cpu.stat user_usec) system=$(cgroup_value cpu.stat system_usec)
    memory=$(cgroup_value memory.peak "") processes=$(cgroup_value pids.peak "")
    io_bytes=$(awk '{ for (i = 2; i <= NF; i++) { split($i, f, "="); if (f[1] == "rbytes") r += f[2]; \
                if (f[1] == "wbytes") w += f[2] } } END { print r + 0, w + 0 }' "$payload_cgroup/io.stat" 2>/dev/null)
    workdir_kib=$(du -sk /scratch/work 2>/dev/null | cut -f1)
    [ -n "$user" ] && awk -v u="$user" -v s="$system" 'BEGIN { printf "cpu_user_s=%.6f\ncpu_system_s=%.6f\n", u / 1e6, s / 1e6 }'
    [ -n "$memory" ] && awk -v m="$memory" 'BEGIN { printf "memory_peak_mib=%.3f\n", m / 1048576 }'
    [ -n "$processes" ] && echo "processes_peak=$processes"
    [ -n "$io_bytes" ] && echo "$io_bytes" | awk '{ printf "io_read_bytes=%d\nio_write_bytes=%d\n", $1, $2 }'
    [ -n "$workdir_kib" ] && awk -v k="$workdir_kib" 'BEGIN { printf "workdir_mib=%.3f\n", k / 1024 }'
    if [ "$1" = live ]; then
        current=$(cgroup_value memory.current "") running=$(cgroup_value pids.current "")
        [ -n "$current" ] && awk -v m="$current" 'BEGIN { printf "memory_current_mib=%.3f\n", m / 1048576 }'
        [ -n "$running" ] && echo "processes=$running"
    fi
    return 0
}
write_usage() {  # into /scratch/vjobs/usage, for the results
    [ -f "$payload_cgroup/cgroup.procs" ] || return 0
    { usage_figures; echo samples=1; } > /scratch/vjobs/usage
}

deliver() {
    [ -n "$1" ] && record error "$1"
    mkdir -p /scratch/vjobs
    cp "$status" /scratch/vjobs/status
    echo vjobs/status > /run/vjobs/list
    for stream in stdout stderr usage; do
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
