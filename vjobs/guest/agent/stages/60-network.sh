# The job's network, only when it asked (the host attaches no interface otherwise): DHCP from the
# hypervisor's side (QEMU's user-mode stack, or the libvirt network), with a bound.
first_interface() {
    for path in /sys/class/net/*; do
        [ "${path##*/}" != lo ] && [ -e "$path" ] && { echo "${path##*/}"; return 0; }
    done
    return 1
}
start_network() {
    tries=0
    while ! interface=$(first_interface) && [ $tries -lt 100 ]; do
        sleep 0.05
        tries=$((tries + 1))
    done
    if [ -z "$interface" ]; then
        say "error: the job asked for a network but the VM has no network interface"
        record network no_interface
        return
    fi
    cat > /run/vjobs/dhcp.sh <<'SCRIPT'
#!/bin/sh
case "$1" in
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
        [ -n "$router" ] && route add default gw "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        ;;
esac
SCRIPT
    chmod +x /run/vjobs/dhcp.sh
    ip link set "$interface" up
    if udhcpc -i "$interface" -s /run/vjobs/dhcp.sh -q -n -t 10 -T 1 > /dev/null 2>&1; then
        say "network: $interface $(ip -4 -o addr show "$interface" | awk '{print $4}')"
        record network "$interface"
    else
        say "error: no DHCP answer on $interface within 10 s"
        record network dhcp_failed
    fi
}
ip link set lo up 2>/dev/null
if [ -n "$NETWORK" ]; then
    start_network
    if [ "$root" != / ] && [ -s /etc/resolv.conf ]; then
        rm -f /newroot/etc/resolv.conf
        cp /etc/resolv.conf /newroot/etc/resolv.conf
    fi
fi
