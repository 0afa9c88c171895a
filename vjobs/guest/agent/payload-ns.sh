# PID 1 of the payload's own PID and mount namespaces (started by stage 70 with unshare). It assembles
# the payload's root, starts the payload as its child, and exits with the payload's status; when it
# exits, the kernel kills whatever the payload left running in the namespace. At the wall time the agent
# sends it SIGTERM, which it passes on to every process of the payload (see the end).
#   $1: the root: /newroot (the overlay over the base image) or / (the initramfs itself)
# Mounts made here exist only in this namespace: nothing the payload sees hides the agent's files.
root=$1
. /run/vjobs/job/settings
fail() {  # the agent reports this as payload_setup_failed, not as the payload's own exit status
    echo "$*" > /scratch/vjobs/payload_setup_error
    exit 125
}
bind() {  # source, target inside the root
    mkdir -p "$root$2" && mount --bind "$1" "$root$2" || fail "cannot bind $1 at $2"
}

mount -t proc proc "$root/proc" || fail "cannot mount /proc"
if [ "$root" != / ]; then
    mount --rbind /sys "$root/sys" || fail "cannot bind /sys"
    mount --rbind /dev "$root/dev" || fail "cannot bind /dev"
fi
mount -t tmpfs -o mode=0755,size=16m run "$root/run" || fail "cannot mount /run"
bind /scratch/vjobs/launch /run/vjobs
bind /scratch/tmp /tmp
[ -n "$WORKDIR" ] && bind /scratch/work "$WORKDIR"
number=0
while read -r head fstype target; do  # the release and read-only binds, mounted by stage 40
    [ -n "$head" ] || continue
    number=$((number + 1))
    bind "/mnt/ro/$number" "$target"
done < /scratch/vjobs/launch/ro_disks
while read -r number target; do  # read-write binds: copies on the scratch disk
    [ -n "$target" ] && bind "/scratch/binds/$number" "$target"
done < /scratch/vjobs/launch/rw_binds
[ -d "$root$CWD" ] || fail "the payload's working directory $CWD does not exist in the guest"

path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ "$root" = / ]; then
    env -i PATH="$path" HOME=/root LANG=C.UTF-8 USER=root sh /run/vjobs/payload.sh &
else
    # The overlay becomes this namespace's root (switch_root's move, then chroot): pivot_root cannot
    # leave an initramfs, and after the move not even a root payload that escapes the chroot sees the
    # agent's files, the base's mount or the scratch disk's other folders.
    if [ "$PAYLOAD_USER" = unprivileged ] && [ ! -x "$root/usr/bin/setpriv" ]; then
        fail "payload_user = unprivileged needs setpriv (util-linux) in the base image"
    fi
    cd "$root" && mount --move . / || fail "cannot make the overlay the payload's root"
    if [ "$PAYLOAD_USER" = unprivileged ]; then
        env -i PATH="$path" HOME=/tmp LANG=C.UTF-8 USER=nobody chroot . /usr/bin/setpriv --reuid=65534 \
            --regid=65534 --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all \
            /bin/sh /run/vjobs/payload.sh &
    else
        env -i PATH="$path" HOME=/root LANG=C.UTF-8 USER=root chroot . /bin/sh /run/vjobs/payload.sh &
    fi
fi
child=$!

# SIGTERM (the wall time, from stage 70) goes to every process in the namespace, not just the first: a
# shell script's children get their chance to write too. Then this waits for all of them, until the
# agent's SIGKILL after stop_grace_s ends whatever is left.
trap 'stopping=1; kill -s TERM -1 2>/dev/null' TERM
while :; do
    wait "$child"
    status=$?
    kill -s 0 "$child" 2>/dev/null || break  # gone: $status is its own; alive: the wait was interrupted
done
if [ -n "$stopping" ]; then
    while kill -s 0 -1 2>/dev/null; do
        sleep 0.1
    done
fi
exit "$status"
