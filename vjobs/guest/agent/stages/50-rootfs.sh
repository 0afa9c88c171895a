# The site's base image: mounted read-only from a read-only disk, under an overlay whose writable layer
# is on the scratch disk, so the payload may change anything and it all vanishes with the VM.
# redirect_dir=on: the kernel's default (off) makes renaming a directory of the base fail with EXDEV.
root=/
if [ -n "$ROOTFS_HEAD" ]; then
    wait_disk "$ROOTFS_HEAD" || deliver rootfs_disk_missing
    base=$disk
    if [ -n "$ROOTFS_PARTITION" ]; then
        base=$base$ROOTFS_PARTITION
        wait_node "$base" || { record detail "no partition $base"; deliver rootfs_mount_failed; }
    fi
    options=ro
    [ "$ROOTFS_FSTYPE" = ext4 ] && options=ro,noload
    mkdir -p /base /newroot /scratch/overlay/upper /scratch/overlay/work
    if ! mount -t "$ROOTFS_FSTYPE" -o "$options" "$base" /base; then
        record detail "mount -t $ROOTFS_FSTYPE $base failed: $(dmesg | tail -n 3 | tr '\n' ' ')"
        deliver rootfs_mount_failed
    fi
    mount -t overlay overlay -o "lowerdir=/base,upperdir=/scratch/overlay/upper,workdir=/scratch/overlay/work,redirect_dir=on" /newroot \
        || { record detail "$(dmesg | tail -n 3 | tr '\n' ' ')"; deliver overlay_failed; }
    root=/newroot
    if [ ! -e /newroot/bin/sh ] && [ ! -L /newroot/bin/sh ]; then
        record detail "the base image has no /bin/sh"
        deliver rootfs_unusable
    fi
fi
