# The kernel's file systems, the "up" marker the host waits for, a probe boot's early exit, the modules.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 shm /dev/shm 2>/dev/null

read -r cmdline < /proc/cmdline  # matched with case, not grep: no fork
if on_cmdline vjobs.probe; then
    say "probe ok kernel=$(uname -r) uptime=$(uptime_s)"
    finish
fi
module_groups
load_modules "$groups"
# A template (vjobs.template): the host saves this guest here, once, and restores it for each job, which
# then needs no kernel boot. The guest waits for a job's io disk to be hot-plugged: until then the host
# has saved it and nothing runs; after a restore the disk appears within milliseconds.
template=""
if on_cmdline vjobs.template; then
    template=1
    zero_free_memory
    say "template ready"
    wait_for_io_disk "$TEMPLATE_WAIT_S" || { say "error: no job came within $TEMPLATE_WAIT_S s"; finish; }
fi
say up
read -r booted _ < /proc/uptime
