# The io disk (it starts with VJOBS-IO-DISK; a restored template found it already): read the job from
# it, start the status record.
if [ -z "$io" ] && ! wait_for_io_disk 10; then
    say "error: no io disk found among: $(block_devices | tr '\n' ' ')"
    finish
fi

mkdir -p /run/vjobs
# The first member says how long the job tar is ("vjobs io disk 2 LENGTH"): read that, not the whole disk.
length=$(dd if="$io" bs=512 skip=1 count=1 2>/dev/null)
length=${length##* }
case "$length" in
    ""|*[!0-9]*) extract() { tar -xf "$io" -C /run/vjobs; } ;;
    *) extract() { head -c "$length" "$io" | tar -xf - -C /run/vjobs; } ;;
esac
extract || { say "error: cannot read the job from $io"; finish; }
job=/run/vjobs/job
. "$job/settings"
# Randomness from the host, credited to the kernel, and a reseed: a guest restored from a template starts
# with the template's random state, which every job from it would share. Its clock is the template's too.
if ! /etc/vjobs/vjobs-reseed "$job/entropy"; then
    say "warning: could not reseed the kernel's random numbers"
    rng_warning=not_reseeded  # recorded once the status record exists, below
fi
[ -n "$template" ] && hwclock -s -u 2>/dev/null
read -r sectors < "/sys/block/${io##*/}/size"  # 512-byte sectors, whatever the device's block size
IO_DISK_BYTES=$((sectors * 512))

: > "$status"
record agent_version 2
record booted_s "$booted"
[ -n "$rng_warning" ] && record rng "$rng_warning"
