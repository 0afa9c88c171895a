# The scratch disk: the working directory (inputs), stdout and stderr, the payload's /tmp, an overlay's
# writable layer. From here on every failure is delivered as a result.
mkdir -p /scratch
wait_disk "$SCRATCH_HEAD" || { say "error: scratch disk not found"; finish; }
scratch=$disk
mount -t ext4 "$scratch" /scratch || { say "error: cannot mount the scratch disk $scratch"; finish; }
mkdir -p /scratch/vjobs /scratch/work /scratch/tmp
chmod 1777 /scratch/tmp

# The inputs (INPUTS_HEAD; none: the job has none): their image, read-only, is the lower layer of an overlay
# at the working directory whose writable layer is on the scratch disk, so the payload may change or delete
# any input (the change is copied up) and the image stays as the host made it. The working directory is the
# writable layer's root: it takes the inputs folder's owner and mode, as a copy of the folder had.
if [ -n "$INPUTS_HEAD" ]; then
    wait_disk "$INPUTS_HEAD" || { record detail "no disk of the inputs"; deliver inputs_failed; }
    mkdir -p /mnt/inputs /scratch/inputs/upper /scratch/inputs/work
    mount -t "$INPUTS_FSTYPE" -o ro "$disk" /mnt/inputs \
        || { record detail "mount -t $INPUTS_FSTYPE $disk failed"; deliver inputs_failed; }
    chown "$(stat -c %u:%g /mnt/inputs)" /scratch/inputs/upper && chmod "$(stat -c %a /mnt/inputs)" /scratch/inputs/upper
    mount -t overlay overlay -o "lowerdir=/mnt/inputs,upperdir=/scratch/inputs/upper,workdir=/scratch/inputs/work,redirect_dir=on" /scratch/work \
        || { record detail "$(dmesg | tail -n 3 | tr '\n' ' ')"; deliver inputs_failed; }
fi
