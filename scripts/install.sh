#!/usr/bin/env bash
# Installs everything vjobs needs on a fresh Debian 12 machine, as root: the system tools that build disks
# and run VMs (apt-get), and vjobs itself into ./.venv (pip). Idempotent.
#   scripts/install.sh          vjobs and what it runs
#   scripts/install.sh --test   the same, plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 qemu-utils busybox-static squashfs-tools erofs-utils e2fsprogs cpio mmdebstrap fdisk curl
          libvirt-daemon-system libvirt-clients libvirt-dev pkg-config tini gcc python3-venv python3-dev
          xrootd-client)
# The servers the tests start (docs/staging.md, docs/scaling.md): XRootD, Slurm, Swift with its S3 API.
[[ "${1:-}" == "--test" ]] && packages+=(xrootd-server slurm-wlm swift swift-proxy swift-account swift-container
                                         swift-object memcached)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "install.sh: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The user qemu_user's QEMU runs as when vjobs runs as root (docs/security.md): no shell, no home, no groups.
if [[ $EUID -eq 0 ]] && ! getent passwd vjobs-qemu >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --user-group vjobs-qemu
    echo "install.sh: created the system user vjobs-qemu" >&2
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".${extra}"
echo "install.sh: vjobs $(.venv/bin/vjobs --version | cut -d' ' -f2) installed in $(pwd)/.venv" >&2
