#!/usr/bin/env bash
# Lets the accounts of group `libvirt` use the system libvirtd (qemu:///system), as root, idempotently. Called by
# scripts/install.sh (for sites) and .ci/libvirt.sh (for the tests); prints "changed" when it changed the file,
# so that the caller restarts a running libvirtd, which reads its settings only when it starts.
#
# Debian's libvirtd lets only root use its read-write socket unless polkit says otherwise, and polkit needs the
# system D-Bus, which these machines (and many worker nodes) do not run: an account then gets "Unable to get
# system bus connection". So the socket's group decides instead: rw for root and group `libvirt` (0770), no
# further authentication. A site grants an account kvm by adding it to that group; read-write access to
# qemu:///system is root-equivalent (docs/security.md says what an account can then do).
set -euo pipefail

CONF=${LIBVIRTD_CONF:-/etc/libvirt/libvirtd.conf}
SETTINGS=('unix_sock_group = "libvirt"' 'unix_sock_rw_perms = "0770"' 'auth_unix_rw = "none"')

[[ -f $CONF ]] || { echo "libvirtd-access.sh: $CONF is missing (is libvirt-daemon-system installed?)" >&2; exit 1; }
getent group libvirt >/dev/null || groupadd --system libvirt

changed=0
for setting in "${SETTINGS[@]}"; do
    key=${setting%% *}
    grep -qxF "$setting" "$CONF" && continue
    sed -i -E "/^[[:space:]]*$key[[:space:]]*=/d" "$CONF"  # another value of ours or the admin's: replaced
    echo "$setting" >>"$CONF"
    changed=1
done
((changed)) && echo changed
true
