#!/bin/bash
# A copy of the floor given with issue 11 (shared/bench/plain-qemu-floor.sh), unchanged below this line.
# The floor for vjobs' fixed per-job cost on this machine: plain qemu-system-x86_64 (microvm, TCG), Debian's
# cloud kernel, a busybox initramfs that mounts one virtio squashfs disk, prints a marker and powers off.
# Builds its material once under $W, then prints the wall seconds of one boot. Usage: plain-qemu-floor.sh [runs]
set -e
W=${W:-${TMPDIR:-/tmp}/vjobs-floor}
mkdir -p "$W"; cd "$W"
if [[ ! -f initrd.raw ]]; then
  for p in qemu-system-x86 busybox-static squashfs-tools cpio kmod; do dpkg -s $p >/dev/null 2>&1 || need=1; done
  [[ -n ${need:-} ]] && { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 busybox-static squashfs-tools cpio kmod >/dev/null; }
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/{print $2; exit}')
  apt-get download -q "$pkg" >/dev/null 2>&1
  dpkg -x linux-image-*.deb k
  V=$(ls k/lib/modules); depmod -b k "$V"
  cp k/boot/vmlinuz-* vmlinuz
  mkdir -p ir/bin ir/proc ir/sys ir/dev ir/mnt ir/mods
  cp /bin/busybox ir/bin/busybox
  for m in virtio_ring virtio virtio_mmio virtio_blk squashfs; do
    f=$(grep -E "/$m.ko:" k/lib/modules/$V/modules.dep | cut -d: -f1); [[ -n $f ]] && cp "k/lib/modules/$V/$f" ir/mods/
  done
  cat > ir/init <<'EOI'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_blk squashfs; do [ -f /mods/$m.ko ] && insmod /mods/$m.ko; done
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.05; done
mount -t squashfs -o ro /dev/vda /mnt && cat /mnt/marker
poweroff -f
EOI
  chmod +x ir/init
  (cd ir && find . | cpio -o -H newc 2>/dev/null > ../initrd.raw)
  mkdir -p rel && echo FLOOR-MARKER > rel/marker && mksquashfs rel rel.sqfs -noappend -quiet >/dev/null
fi
runs=${1:-1}
for i in $(seq 1 "$runs"); do
  s=$(date +%s.%N)
  out=$(timeout 60 qemu-system-x86_64 -machine microvm,accel=tcg -m 256 -smp 1 -nographic -no-reboot -nodefaults \
    -serial stdio -kernel vmlinuz -initrd initrd.raw -append "console=ttyS0 quiet panic=-1" \
    -drive id=d0,file=rel.sqfs,format=raw,if=none,readonly=on -device virtio-blk-device,drive=d0 2>&1)
  e=$(date +%s.%N)
  grep -q FLOOR-MARKER <<<"$out" || { echo "boot failed"; exit 1; }
  echo "$e - $s" | bc
done
