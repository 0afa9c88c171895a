#!/bin/busybox sh
# dom0's first stage: the standard kernel has ext4 and virtio_blk as modules, so load them (in dependency
# order: busybox insmod resolves nothing), mount the root disk and hand over to the root's own init.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
    insmod "/modules/$module.ko" || echo "vjobs-initramfs: cannot load $module"
done
for try in 1 2 3 4 5 6 7 8 9 10; do
    [ -b /dev/vda ] && break
    sleep 1
done
mkdir -p /newroot
if ! mount -t ext4 /dev/vda /newroot; then
    echo "vjobs-initramfs: cannot mount the root disk /dev/vda"
    poweroff -f
fi
umount /proc /sys /dev
exec switch_root /newroot /sbin/vjobs-dom0-init
