#!/bin/sh
# L2's /init (passthru-msi): QEMU's edu (1234:11e8) passed through from L1, no driver in L2
# (the Debian cloud kernel has no VFIO no-IOMMU mode). msit gives edu's MSI capability the
# message of virtio-rng's MSI-X config vector and counts that IRQ per edu raise.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio-rng; do
    insmod /lib/modules/$m.ko
done
echo
edu=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = 0x1234:0x11e8 ] && edu=${d##*/}
    echo "L2-PCI ${d##*/} $(cat $d/vendor):$(cat $d/device) class=$(cat $d/class)"
done
donor="" name=""
i=0
while [ -z "$donor" ] && [ $i -lt 50 ]; do
    for v in /sys/bus/virtio/devices/virtio*; do
        [ "$(cat $v/device 2>/dev/null)" = 0x0004 ] || continue
        donor=$(basename "$(dirname "$(readlink -f $v)")"); name="${v##*/}-config"
    done
    [ -n "$donor" ] || { sleep 0.1; i=$((i + 1)); }
done
echo "L2-EDU=${edu:-none} L2-DONOR=${donor:-none} L2-DONOR-IRQ=$name"
grep -E 'virtio' /proc/interrupts | sed 's/^ */L2-IRQ /'
if [ -n "$edu" ] && [ -n "$donor" ]; then
    echo "L2-EDU-DRIVER=$(basename "$(readlink /sys/bus/pci/devices/$edu/driver 2>/dev/null)")"
    /bin/msit "$edu" "$donor" "$name" 2>&1
    echo "L2-MSIT-EXIT=$?"
fi
grep -E 'virtio' /proc/interrupts | sed 's/^ */L2-IRQ /'
dmesg | grep -iE 'irq|spurious|nobody' | tail -n 5 | sed 's/^/L2-DMESG /'
echo "L2-INIT-REACHED"
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
