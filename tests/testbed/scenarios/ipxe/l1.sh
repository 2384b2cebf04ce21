# Runs in L1 (busybox sh, testbed.sh sourced), rhyve only: SeaBIOS runs iPXE from
# virtio-net's expansion ROM (rom=pxe-virtio.rom). iPXE's own virtio driver gets a DHCP
# lease from dnsmasq on L1's tap (in a network namespace of this script's own), fetches an
# iPXE script over TFTP, then the stock kernel and L2's initramfs, and boots them to /init.
. /testbed/net.sh
net_enter_netns /scenario/l1.sh
NET_TAP=tap0 NET_L1=10.0.2.1
net_tap || exit 1

# dnsmasq looks its user up; L1's root has no passwd of its own.
[ -e /etc/passwd ] || { mkdir -p /etc; echo 'root:x:0:0:root:/:/bin/sh' >/etc/passwd; echo 'root:x:0:' >/etc/group; }
TFTP=/tmp/tftp
mkdir -p "$TFTP"
cp /l2/vmlinuz /l2/initrd.cpio "$TFTP"/
cat >"$TFTP/boot.ipxe" <<'IPXE'
#!ipxe
echo rhyve-ipxe: script fetched from ${next-server} by ${net0/ip}
kernel tftp://${next-server}/vmlinuz console=ttyS0 quiet rhyve.netboot=ipxe
initrd tftp://${next-server}/initrd.cpio
boot
IPXE
/usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --user=root --group=root \
    --interface=tap0 --bind-interfaces --port=0 \
    --dhcp-range=10.0.2.50,10.0.2.60,255.255.255.0,1h --dhcp-leasefile=/tmp/dnsmasq.leases \
    --dhcp-boot=boot.ipxe --enable-tftp --tftp-root="$TFTP" \
    --log-dhcp --log-facility=/tmp/dnsmasq.log --pid-file=/tmp/dnsmasq.pid &
dns=$!
sleep 1

TESTBED_VMM_BIN="$TESTBED_RHYVE_BIN" testbed_boot --firmware /usr/share/seabios/bios-256k.bin \
    --mem 512M --name pxe --marker L2-INIT-REACHED --timeout 300 \
    -- -s 3,virtio-net,tap0,rom=/usr/lib/ipxe/qemu/pxe-virtio.rom,bootindex=0
rc=$?
kill "$dns" 2>/dev/null
sed 's/^/dnsmasq| /' /tmp/dnsmasq.log
testbed_say "ipxe-vmm-exit=$rc"
true
