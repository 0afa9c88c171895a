# The scratch disk: the working directory (inputs), stdout and stderr, the payload's /tmp, an overlay's
# writable layer. From here on every failure is delivered as a result.
mkdir -p /scratch
wait_disk "$SCRATCH_HEAD" || { say "error: scratch disk not found"; finish; }
scratch=$disk
mount -t ext4 "$scratch" /scratch || { say "error: cannot mount the scratch disk $scratch"; finish; }
mkdir -p /scratch/vjobs /scratch/work /scratch/tmp
chmod 1777 /scratch/tmp
