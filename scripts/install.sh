#!/usr/bin/env bash
# Installs everything vjobs needs on a fresh Debian 12 machine, as root: the system tools that build disks
# and run VMs (apt-get), vjobs itself into ./.venv (pip), and the node as README "For sites" describes it: the
# system folders, the QEMU user, libvirtd usable by group `libvirt`, and the built-in images in the system
# cache, built once for every account. Idempotent.
#   scripts/install.sh          vjobs and what it runs
#   scripts/install.sh --test   the same, plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

# skopeo and umoci fetch and make OCI image layouts, which `vjobs exec` boots (it unpacks them itself).
packages=(qemu-system-x86 qemu-utils busybox-static squashfs-tools erofs-utils e2fsprogs cpio mmdebstrap fdisk curl
          libvirt-daemon-system libvirt-clients libvirt-dev pkg-config tini gcc python3-venv python3-dev
          xrootd-client skopeo umoci)
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

if [[ $EUID -eq 0 ]]; then
    # The system cache (root builds the built-in images there; accounts read it, never write it) and the
    # folder of the site config. Modes as vjobs wants them: writable by root alone.
    install -d -o root -g root -m 0755 /var/cache/vjobs /etc/vjobs
    # The system libvirtd for the accounts a site adds to group libvirt (docs/security.md: root-equivalent).
    if [[ -n $(scripts/libvirtd-access.sh) ]]; then
        echo "install.sh: libvirtd.conf: group libvirt may use qemu:///system" >&2
        if command -v systemctl >/dev/null && systemctl is-active --quiet libvirtd 2>/dev/null; then
            systemctl restart libvirtd  # it reads its settings only when it starts
        elif [[ -s /run/libvirtd.pid ]] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; then
            echo "install.sh: restart libvirtd to apply it" >&2
        fi
    fi
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".${extra}"
echo "install.sh: vjobs $(.venv/bin/vjobs --version | cut -d' ' -f2) installed in $(pwd)/.venv" >&2

if [[ $EUID -eq 0 ]]; then
    # The built-in images, built once by root for every account (a no-op when they are up to date).
    for image in default debian12; do
        .venv/bin/vjobs image build "$image" >/dev/null
    done
    echo "install.sh: the built-in images default and debian12 are built in the system cache" >&2
    # The node's one host budget, shared by every account (vjobs/host/admission.py): root's token files in
    # /var/lib/vjobs/admission, sized from [host] of /etc/vjobs/site.toml (or what the machine has).
    .venv/bin/python -c 'from vjobs.config.site import load_site
from vjobs.host.admission import prepare_host_folder
print("install.sh:", prepare_host_folder(load_site()))' >&2
fi
