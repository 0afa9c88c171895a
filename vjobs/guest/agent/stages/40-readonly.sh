# Read-only disks (the release, read-only binds): each mounted read-only from a read-only disk at
# /mnt/ro/N; the payload's namespace binds it at its guest path. job/ro_disks: "head fstype path" lines.
number=0
while read -r head fstype target; do
    [ -n "$head" ] || continue
    number=$((number + 1))
    wait_disk "$head" || { record detail "$target"; deliver readonly_disk_missing; }
    device=$disk
    mkdir -p "/mnt/ro/$number"
    mount -t "$fstype" -o ro "$device" "/mnt/ro/$number" || { record detail "$target"; deliver readonly_mount_failed; }
done < "$job/ro_disks"
