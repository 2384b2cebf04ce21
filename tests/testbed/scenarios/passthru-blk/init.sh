#!/bin/sh
# L2's /init (passthru-blk): Linux's own virtio_pci/virtio_blk on a virtio-blk function passed
# through from L1 (modern-only, 1af4:1042, 16 MiB of zeros): check that it reads zeros, write
# 4 MiB of a pattern with O_DIRECT, read it back past the page cache, show its MSI-X vectors'
# interrupt counts. The host checks the image file afterwards (check-host).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo
if [ ! -b /dev/vda ]; then
    echo "L2-PT-NO-DISK"
    for d in /sys/bus/pci/devices/*; do echo "L2-PCI ${d##*/} $(cat $d/vendor):$(cat $d/device)"; done
    dmesg | tail -n 30
    reboot -f
fi
dev=$(dirname "$(readlink -f /sys/block/vda/device)")
vendor=$(cat "$dev/vendor"); device=$(cat "$dev/device")
echo "L2-PT-PCI=${dev##*/} L2-PT-ID=${vendor#0x}:${device#0x}"
echo "L2-PT-SIZE=$(cat /sys/block/vda/size)"
MIB4=4194304
zeros=$(head -c $MIB4 /dev/zero | md5sum | cut -d' ' -f1)
before=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$before" = "$zeros" ] && echo "L2-PT-BEFORE=zeros" || echo "L2-PT-BEFORE=data md5=$before"
yes rhyve-passthru-0123456789abcdef | head -c $MIB4 >/tmp/pattern
want=$(md5sum </tmp/pattern | cut -d' ' -f1)
if dd if=/tmp/pattern of=/dev/vda bs=1M oflag=direct conv=fsync 2>/tmp/dd.err; then
    echo "L2-PT-WRITE=direct"
else
    sed 's/^/L2-DD-ERR /' /tmp/dd.err
    dd if=/tmp/pattern of=/dev/vda bs=1M conv=fsync 2>/dev/null && sync
    echo "L2-PT-WRITE=buffered"
fi
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "L2-PT-WANT-MD5=$want"
echo "L2-PT-READ-MD5=$got"
[ "$got" = "$want" ] && echo "L2-PT-READBACK=match" || echo "L2-PT-READBACK=differs"
# The function's interrupts: MSI-X vectors (virtioN-config, virtioN-req.0) and their counts.
echo "L2-PT-IRQ-MODE=$(cat "$dev"/msi_irqs/* 2>/dev/null | sort -u | tr '\n' ' ')"
grep virtio /proc/interrupts | sed 's/^ */L2-IRQ /'
echo "L2-PT-REQ-IRQS=$(grep -E 'virtio[0-9]+-req' /proc/interrupts | awk '{ s += $2 } END { print s + 0 }')"
# With pci=nomsi: one INTx line (IO-APIC, level) shared by config changes and the queue.
echo "L2-PT-INTX-IRQS=$(grep -E 'IO-APIC.*virtio[0-9]+$' /proc/interrupts | awk '{ s += $2 } END { print s + 0 }')"
echo "L2-INIT-REACHED"
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
