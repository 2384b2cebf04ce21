#!/bin/sh
# L2's /init for the virtio-net scenarios (net-bench/init.sh is a link to this file): Linux's own
# virtio_pci/virtio_net drivers against the VMM's virtio-net device on a tap in L1.
# L2 is 10.0.2.2/24 on eth0, L1's tap is 10.0.2.1/24; the L1 half is tests/testbed/lib/net.sh.
#   1. eth0 up, listener on port 5002 started, L1 pinged,
#   2. a stream to L1:5001, then the stream L1 sends back to 5002 is received.
# Kernel command line: net_mode=check (default; NET_MIB MiB of a known pattern each way, md5
# compared by the receiver against the pattern it regenerates) or net_mode=bench (zeros through
# `nc -e dd`, 64 KiB per system call, timed by the receiver from accept to EOF:
# `NET-BENCH <name> us=N bytes=N rc=0`); net_mib=N (default 8); net_l1=ADDR, net_l2=ADDR
# (defaults 10.0.2.1 and 10.0.2.2, /24; passthru-net, which links this file, uses 10.0.3.x).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko || echo "L2-INSMOD-FAILED $m"
done
mode=check mib=8 L1=10.0.2.1 L2=10.0.2.2
for w in $(cat /proc/cmdline); do
    case "$w" in
        net_mode=*) mode=${w#net_mode=} ;;
        net_mib=*) mib=${w#net_mib=} ;;
        net_l1=*) L1=${w#net_l1=} ;;
        net_l2=*) L2=${w#net_l2=} ;;
    esac
done
bytes=$((mib << 20)) failed=""
# ns clock (/proc/timer_list "now at"), /proc/uptime (10 ms) if that is missing
now_us() {
    ns=$(sed -n 's/^now at \([0-9]*\) nsecs.*/\1/p' /proc/timer_list 2>/dev/null | head -n 1)
    if [ -n "$ns" ]; then
        echo $((ns / 1000))
    else
        read -r up _ </proc/uptime
        echo $(( ${up%.*} * 1000000 + $(echo "${up#*.}" | sed 's/^0*//;s/^$/0/') * 10000 ))
    fi
}
# The check-mode stream of one direction: BYTES of a line pattern naming that direction.
pattern() { yes "rhyve-virtio-net-$1-0123456789abcdef" | head -c "$2"; }
md5() { md5sum | cut -d' ' -f1; }
stats() {
    for c in rx_bytes rx_packets tx_bytes tx_packets rx_errors tx_errors rx_dropped tx_dropped; do
        printf '%s=%s ' $c "$(cat /sys/class/net/eth0/statistics/$c 2>/dev/null)"
    done | sed 's/^/L2-ETH0-STATS /'
    echo
}
finish() {
    # Something went wrong: the kernel's view, for the device's author.
    if [ -n "$failed" ]; then
        dmesg | tail -n 60 | sed 's/^/L2-DMESG-TAIL /'
        grep -i virtio /proc/interrupts | sed 's/^/L2-IRQS /'
        stats
    fi
    echo
    echo "L2-INIT-REACHED"
    reboot -f
    sleep 10
    echo "L2-REBOOT-FAILED"
}
echo
dmesg | grep -iE 'virtio|eth0' | sed 's/^/L2-DMESG /'
if [ ! -d /sys/class/net/eth0 ]; then
    echo "L2-NET-NO-ETH0 $(ls /sys/class/net | tr '\n' ' ')"
    failed=1
    finish
fi
echo "L2-ETH0 driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)") mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
echo "L2-ETH0-FEATURES $(cat /sys/class/net/eth0/device/features)"
# The PCI function under the virtio device, and how it interrupts (msix per vector, or none:
# INTx); the vectors' names are virtioN-input.0, virtioN-output.0, virtioN-config.
vdev=$(basename "$(readlink -f /sys/class/net/eth0/device)")
pci=$(dirname "$(readlink -f /sys/class/net/eth0/device)")
echo "L2-ETH0-PCI=${pci##*/} id=$(sed 's/^0x//' "$pci/vendor"):$(sed 's/^0x//' "$pci/device") irq-mode=$(cat "$pci"/msi_irqs/* 2>/dev/null | sort -u | tr '\n' ' ')"
# interrupt count of one of the device's vectors (all CPUs)
irqs() {
    grep -E " $vdev-$1\$" /proc/interrupts |
        awk '{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } END { print s + 0 }'
}
ip link set lo up
ip addr add "$L2/24" dev eth0
ip link set eth0 up
# The link is up once virtio_net reports carrier (VIRTIO_NET_S_LINK_UP, or no STATUS feature)
# and the stack took note (operstate, set asynchronously).
i=0
while { [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] ||
        [ "$(cat /sys/class/net/eth0/operstate)" != up ]; } && [ $i -lt 50 ]; do
    sleep 0.1; i=$((i + 1))
done
echo "L2-LINK carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null) operstate=$(cat /sys/class/net/eth0/operstate)"
[ $i -lt 50 ] || failed=1

# Each transfer is bounded (check: 90 s, bench: 180 s) so that a stalled device still gets
# L2's report out before L1's watchdog kills the VMM.
limit=90
[ "$mode" = bench ] && limit=180

# Listener for L1's stream, up before L2 sends its own (L1 sends once it received ours).
if [ "$mode" = bench ]; then
    # run by nc -e with the connection as stdin/stdout
    cat >/tmp/rx.sh <<'RX'
now_us() { sed -n 's/^now at \([0-9]*\) nsecs.*/\1/p' /proc/timer_list | head -n 1 | sed 's/...$//'; }
t0=$(now_us)
n=$(dd bs=64k 2>/dev/null | wc -c)
t1=$(now_us)
echo "NET-BENCH $1 us=$((t1 - t0)) bytes=$n rc=0" >/dev/console
echo "$n" >/tmp/rx.count
RX
    nc -l -p 5002 -e sh /tmp/rx.sh tcp-l1-to-l2 &
else
    # stdin: a FIFO nc holds open itself: busybox nc half-closes the connection on stdin EOF,
    # which would end the sender early
    mkfifo /tmp/hold
    nc -l -p 5002 <>/tmp/hold >/tmp/rx.bin &
fi
rxpid=$!

out=$(ping -c 3 -W 5 $L1 2>&1)
echo "$out" | sed 's/^/L2-PING /'
case "$out" in
    *" 3 packets received"*) echo "L2-PING-L1=ok" ;;
    *) echo "L2-PING-L1=failed"; failed=1 ;;
esac

# L2's CPU time (user nice system idle iowait irq softirq ... in ticks) around its send
echo "L2-CPU tx-start $(sed -n 's/^cpu  *//p' /proc/stat)"
if [ "$mode" = bench ]; then
    timeout $limit nc $L1 5001 -e dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null
    rc=$?
    echo "L2-TX-DONE rc=$rc"
    [ $rc = 0 ] || failed=1
else
    pattern l2-to-l1 $bytes >/tmp/tx.bin
    echo "L2-TX bytes=$(wc -c </tmp/tx.bin) md5=$(md5 </tmp/tx.bin)"
    timeout $limit nc $L1 5001 </tmp/tx.bin
    rc=$?
    echo "L2-TX-DONE rc=$rc"
    [ $rc = 0 ] || failed=1
fi

echo "L2-CPU tx-done $(sed -n 's/^cpu  *//p' /proc/stat)"

# L1's stream: wait for the listener (bounded).
i=0 n=$((limit * 4))
while kill -0 $rxpid 2>/dev/null && [ $i -lt $n ]; do
    sleep 0.25; i=$((i + 1))
done
if kill -0 $rxpid 2>/dev/null; then
    echo "L2-RX-TIMEOUT"
    failed=1
    kill $rxpid
fi
wait $rxpid
echo "L2-CPU rx-done $(sed -n 's/^cpu  *//p' /proc/stat)"
if [ "$mode" = bench ]; then
    echo "L2-RX bytes=$(cat /tmp/rx.count 2>/dev/null)"
else
    got=$(md5 </tmp/rx.bin)
    want=$(pattern l1-to-l2 "$(wc -c </tmp/rx.bin)" | md5)
    echo "L2-RX bytes=$(wc -c </tmp/rx.bin) md5=$got"
    if [ "$got" = "$(pattern l1-to-l2 $bytes | md5)" ]; then
        echo "L2-RX-DATA=match"
    elif [ "$got" = "$want" ]; then
        echo "L2-RX-DATA=truncated"; failed=1
    else
        echo "L2-RX-DATA=differs"; failed=1
    fi
fi
stats
grep -i virtio /proc/interrupts | sed 's/^/L2-IRQS /'
echo "L2-NET-IRQS input=$(irqs input.0) output=$(irqs output.0) config=$(irqs config)"
echo "L2-NET-DONE"
finish
