#!/bin/sh
# L2's /init: Linux's own virtio_pci/virtio_blk drivers against the VMM's virtio-blk disks:
# vda (8 MiB, writable) gets a pattern over its whole length, vdb (read-only) must refuse writes.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko
done
dmesg | grep 'virtio_blk virtio'
echo "L2-VDA-SIZE=$(cat /sys/block/vda/size)"
yes rhyve-pattern-0123456789 | head -c 8388608 >/dev/vda
sync
echo 3 >/proc/sys/vm/drop_caches
echo "L2-VDA-MD5=$(md5sum </dev/vda | cut -d' ' -f1)"
echo "L2-VDB-RO=$(cat /sys/block/vdb/ro)"
if echo x | dd of=/dev/vdb bs=512 count=1 oflag=direct 2>/dev/null; then
    echo "L2-VDB-WRITE-ACCEPTED"
else
    echo "L2-VDB-WRITE-REFUSED"
fi
echo "L2-INIT-REACHED"
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
