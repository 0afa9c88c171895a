# Find the io disk (it starts with VJOBS-IO-DISK), read the job from it, start the status record.
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

: > "$status"
record agent_version 2
record booted_s "$booted"
