# The release, read-only from a read-only disk; the payload's namespace binds it at its mount point.
if [ -n "$RELEASE_HEAD" ]; then
    release=$(wait_disk "$RELEASE_HEAD") || deliver release_disk_missing
    mkdir -p /mnt/release
    mount -t "$RELEASE_FSTYPE" -o ro "$release" /mnt/release || deliver release_mount_failed
fi
