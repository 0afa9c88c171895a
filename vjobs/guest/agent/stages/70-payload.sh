# The payload: in its own PID and mount namespaces (so whatever it leaves running ends with it), in the
# base image when there is one, with a clean environment: the job's env over a sane default.
launch=/scratch/vjobs/launch
mkdir -p "$launch"
cp "$job/env.sh" "$job/command.sh" "$job/ro_disks" "$job/rw_binds" "$launch/"
cat > "$launch/payload.sh" <<SCRIPT
cd "$CWD" || exit 125
. /run/vjobs/env.sh
exec /bin/sh /run/vjobs/command.sh
SCRIPT
if [ "$PAYLOAD_USER" = unprivileged ]; then
    # The inputs' image is the payload user's already (the host made it so): a chown through the overlay
    # would copy every input up onto the scratch disk.
    [ -n "$INPUTS_HEAD" ] || chown -R 65534:65534 /scratch/work
    [ -d /scratch/binds ] && chown -R 65534:65534 /scratch/binds
fi

cd /scratch/work
record started_s "$(uptime_s)"
say "running the payload"
make_payload_cgroup
[ -n "$LIVE_CHANNEL" ] && find_host_channel && start_sync  # what the payload starts from: a round sends what differs
# The launcher joins the payload's cgroup before it starts anything, so every process of the payload is in it.
sh -c '[ -d "$1" ] && echo $$ > "$1/cgroup.procs"; shift; exec "$@"' cgroup "$payload_cgroup" \
    unshare --mount --pid --fork --propagation private sh /etc/vjobs/payload-ns.sh "$root" \
    < /dev/null > /scratch/vjobs/stdout 2> /scratch/vjobs/stderr &
launcher=$!
watch_wall_time "$launcher" &
watchdog=$!
serve_host_channel &
streamer=$!
wait "$launcher"
payload_status=$?
kill "$watchdog" 2>/dev/null
stop_serving "$streamer"  # before anything is written onto the io disk
record ended_s "$(uptime_s)"
write_usage
if [ -s /scratch/vjobs/payload_setup_error ]; then
    record detail "$(cat /scratch/vjobs/payload_setup_error)"
    deliver payload_setup_failed
fi
record exit_code $payload_status
