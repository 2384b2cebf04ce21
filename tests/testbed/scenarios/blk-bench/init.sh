#!/bin/sh
# L2's /init: sequential throughput of Linux's own virtio_blk driver against the VMM's disk,
# with O_DIRECT (no L2 page cache): 1 MiB and 4 KiB blocks, writes then reads, one dd each.
# Writes end with conv=fsync (a virtio FLUSH: fdatasync in the VMM), inside the timed span.
# Each test prints `L2-BENCH <name> ms=<ms> us=<us> bytes=<bytes>`; timing from the kernel's
# ns clock (/proc/timer_list "now at"), /proc/uptime (10 ms) if that is missing.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko
done
now_us() {
    ns=$(sed -n 's/^now at \([0-9]*\) nsecs.*/\1/p' /proc/timer_list 2>/dev/null | head -n 1)
    if [ -n "$ns" ]; then
        echo $((ns / 1000))
    else
        read -r up _ </proc/uptime
        echo $(( ${up%.*} * 1000000 + $(echo "${up#*.}" | sed 's/^0*//;s/^$/0/') * 10000 ))
    fi
}
# bench NAME BYTES dd-args...
bench() {
    name=$1 bytes=$2
    shift 2
    t0=$(now_us)
    if dd "$@" 2>/tmp/dd.err; then
        t1=$(now_us)
        us=$((t1 - t0))
        echo "L2-BENCH $name ms=$((us / 1000)) us=$us bytes=$bytes"
    else
        echo "L2-BENCH-FAILED $name $(cat /tmp/dd.err)"
    fi
}
echo
echo "L2-VDA-SIZE=$(cat /sys/block/vda/size)"
MIB=64      # 1 MiB requests: 64 MiB each way, at offset 0
K4=2048     # 4 KiB requests: 8 MiB each way, at offset 64 MiB
# One untimed pass over the whole disk so that neither VMM's first touch of the image counts.
dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null
bench seq-write-1m $((MIB << 20)) if=/dev/zero of=/dev/vda bs=1M count=$MIB oflag=direct conv=fsync
bench seq-read-1m $((MIB << 20)) if=/dev/vda of=/dev/null bs=1M count=$MIB iflag=direct
bench seq-write-4k $((K4 << 12)) if=/dev/zero of=/dev/vda bs=4k count=$K4 seek=16384 oflag=direct conv=fsync
bench seq-read-4k $((K4 << 12)) if=/dev/vda of=/dev/null bs=4k count=$K4 skip=16384 iflag=direct
echo "L2-BENCH-DONE"
echo "L2-INIT-REACHED"
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
