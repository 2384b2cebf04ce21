#!/bin/sh
# L2's /init for the snapshot scenario: a workload that a suspend, a restore, a checkpoint, a
# kill and a second restore must not notice. ROUNDS rounds, each: 256 KiB of the round's own
# pattern written to vda at the round's offset, synced, the page cache dropped, read back from
# the device and md5-compared; one ping to L1 (10.0.2.1) over virtio-net. Then every round's
# data is read back once more. A lost interrupt stalls a round: `timeout` bounds each step.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko || echo "L2-INSMOD-FAILED $m"
done
rounds=24
for w in $(cat /proc/cmdline); do
    case "$w" in snap_rounds=*) rounds=${w#snap_rounds=} ;; esac
done
ip link set lo up
ip addr add 10.0.2.2/24 dev eth0
ip link set eth0 up
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
    sleep 0.1; i=$((i + 1))
done
echo
echo "L2-SNAP-START rounds=$rounds vda=$(cat /sys/block/vda/size) eth0=$(cat /sys/class/net/eth0/operstate)"
pattern() { yes "rhyve-snapshot-round-$1-0123456789abcdef" | head -c 262144; }
md5() { md5sum | cut -d' ' -f1; }
# Round N's 256 KiB at offset N * 256 KiB.
readback() { timeout 30 dd if=/dev/vda bs=64k skip=$(($1 * 4)) count=4 2>/dev/null | md5; }
fails=0
n=1
while [ $n -le "$rounds" ]; do
    pattern $n >/tmp/w
    want=$(md5 </tmp/w)
    timeout 30 dd if=/tmp/w of=/dev/vda bs=64k seek=$((n * 4)) conv=notrunc 2>/dev/null
    timeout 30 sync
    echo 3 >/proc/sys/vm/drop_caches
    [ "$(readback $n)" = "$want" ] && blk=ok || blk=bad
    timeout 20 ping -c 1 -W 5 10.0.2.1 >/dev/null 2>&1 && net=ok || net=bad
    [ $blk = ok ] && [ $net = ok ] || fails=$((fails + 1))
    echo "L2-SNAP-ROUND $n blk=$blk net=$net"
    n=$((n + 1))
done
echo 3 >/proc/sys/vm/drop_caches
bad=0
n=1
while [ $n -le "$rounds" ]; do
    [ "$(readback $n)" = "$(pattern $n | md5)" ] || bad=$((bad + 1))
    n=$((n + 1))
done
echo "L2-SNAP-DONE rounds=$rounds fails=$fails verify-bad=$bad"
echo "L2-INIT-REACHED"
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
