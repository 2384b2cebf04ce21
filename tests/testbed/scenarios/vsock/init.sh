#!/bin/sh
# L2's /init: Linux's own vsock driver (vsock, vmw_vsock_virtio_transport_common,
# vmw_vsock_virtio_transport) against the VMM's virtio-vsock device, guest CID 3. The tool is
# /bin/vsockt (vsockt.c, built by prepare-host). Both directions at once:
#   host-initiated:  L1 connects to port 5000, where L2's echo server serves one connection
#                    (1 MiB of L1's pattern, echoed back; L1 half-closes, L2 still sends the rest);
#   guest-initiated: L2 sends 1 MiB of its pattern to CID 2 port 6000 and reads L1's echo;
#   and a connect to CID 2 port 6999, where nothing listens, must be refused.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    insmod /lib/modules/$m.ko || echo "L2-INSMOD-FAILED $m"
done
T=/bin/vsockt
BYTES=1048576
failed=""
finish() {
    # Something went wrong: the kernel's view, for the device's author.
    if [ -n "$failed" ]; then
        dmesg | tail -n 60 | sed 's/^/L2-DMESG-TAIL /'
        grep -i virtio /proc/interrupts | sed 's/^/L2-IRQS /'
    fi
    echo
    echo "L2-VSOCK-DONE failed=${failed:-no}"
    reboot -f
    sleep 10
    echo "L2-REBOOT-FAILED"
}
echo
echo "L2-INIT-REACHED"
dmesg | grep -iE 'vsock|virtio' | sed 's/^/L2-DMESG /'
drv=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport
dev=""
for d in "$drv"/virtio*; do [ -e "$d" ] && dev=$(basename "$d"); done
if [ -z "$dev" ]; then
    echo "L2-VSOCK-NO-DRIVER $(ls /sys/bus/virtio/devices 2>/dev/null | tr '\n' ' ')"
    for d in /sys/bus/virtio/devices/*; do
        [ -e "$d" ] && echo "L2-VIRTIO-DEV $(basename "$d") device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver")")"
    done
    failed=1
    finish
fi
pci=$(basename "$(readlink -f /sys/bus/virtio/devices/$dev/..)")
echo "L2-VSOCK-DRIVER $dev driver=vmw_vsock_virtio_transport virtio-id=$(cat /sys/bus/virtio/devices/$dev/device) pci=$pci pci-id=$(cat /sys/bus/pci/devices/$pci/vendor 2>/dev/null):$(cat /sys/bus/pci/devices/$pci/device 2>/dev/null) features=$(cat /sys/bus/virtio/devices/$dev/features)"
$T local-cid || failed=1

# Host-initiated: one connection on 5000, its incoming stream checked against L1's pattern.
$T -w 120 -t 90 echo-server 5000 1 $BYTES &
epid=$!
# Nothing listens on the host's 6999.
$T probe 2 6999 || failed=1
# Guest-initiated: 1 MiB to the host's 6000 (L1: vsockt uds-echo on <path>_6000), echo checked.
$T -t 90 send 2 6000 $BYTES || failed=1
# The host-initiated transfer ends with the echo server (bounded by its own -w/-t, and here).
i=0
while kill -0 $epid 2>/dev/null && [ $i -lt 960 ]; do
    sleep 0.25; i=$((i + 1))
done
if kill -0 $epid 2>/dev/null; then
    echo "L2-ECHO-TIMEOUT"
    kill $epid
    failed=1
fi
wait $epid || failed=1
grep -i virtio /proc/interrupts | sed 's/^/L2-IRQS /'
finish
