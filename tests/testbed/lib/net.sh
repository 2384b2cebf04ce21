# net.sh: the L1 half of the virtio-net scenarios (virtio-net, net-bench); sourced by their l1.sh
# after testbed.sh. L2's half is scenarios/virtio-net/init.sh.
#
# Everything runs in a network namespace of its own (unshare -n) holding loopback and one tap,
# tap0 = 10.0.2.1/24; L2 is 10.0.2.2/24 on its eth0. No other address is ever used, and the
# namespace (with the tap) goes away when the scenario's shell exits.
#   1. L1 listens on 5001 before the VMM starts.
#   2. L2 brings eth0 up, starts its listener on 5002, pings L1, sends its stream to L1:5001.
#   3. L1, once that stream ended, pings L2 and sends its own stream to L2:5002.
# Mode check: NET_MIB MiB of a known line pattern per direction through plain nc, both ends
# print bytes and md5, the receiver compares with the pattern it regenerates. Mode bench: zeros,
# `nc -e dd` on both ends, so the socket is read and written 64 KiB at a time (nc's own copy
# loop moves 1 KiB per system call: under TCG that, not the VMM, would be measured); the
# receiver times from accept to EOF and prints `NET-BENCH <name> us=N bytes=N rc=N`.
# Results: TESTBED: net-* lines (L1), L2-* lines (L2), NET-BENCH (both).
# scenarios/passthru-net uses the same exchange without a tap: L1's own NIC (NET_TAP=its
# interface), 10.0.3.1 and 10.0.3.2 (set NET_TAP, NET_L1, NET_L2 before sourcing this file,
# then call net_run; L2 learns the addresses from its command line, net_l1= and net_l2=).

: "${NET_TAP:=tap0}" "${NET_L1:=10.0.2.1}" "${NET_L2:=10.0.2.2}"
export NET_TAP NET_L1 NET_L2

# net_enter_netns SCRIPT: re-run SCRIPT (sourced, as the harness does) in a new network
# namespace; returns only inside it.
net_enter_netns() {
    [ "$TESTBED_NETNS" = 1 ] && return 0
    TESTBED_NETNS=1 exec unshare -n sh -c '. /testbed/testbed.sh; . /testbed/net.sh; . "$0"' "$1"
}

# net_tap: tun.ko, loopback up, tap0 (persistent, for the VMM to attach) with L1's address.
net_tap() {
    [ -c /dev/net/tun ] || insmod /lib/modules/testbed/tun.ko || testbed_say "insmod-failed=tun"
    ip link set lo up
    tunctl -t "$NET_TAP" >/dev/null || { testbed_say "net-tap=failed"; return 1; }
    ip addr add "$NET_L1/24" dev "$NET_TAP"
    ip link set "$NET_TAP" up
    testbed_say "net-tap=$NET_TAP $NET_L1/24 netns=$(readlink /proc/self/ns/net)"
}

# The VMM arguments for one virtio-net device on tap0 (QEMU: userspace virtio-net, no vhost).
net_vmm_args() {
    case "$TESTBED_VMM" in
        rhyve) echo "-s 3,virtio-net,$NET_TAP" ;;
        qemu) echo "-netdev tap,id=n0,ifname=$NET_TAP,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,romfile=" ;;
    esac
}

net_now_us() {
    local ns
    ns=$(sed -n 's/^now at \([0-9]*\) nsecs.*/\1/p' /proc/timer_list 2>/dev/null | head -n 1)
    if [ -n "$ns" ]; then
        echo $((ns / 1000))
    else
        echo $(($(testbed_now_ms) * 1000))
    fi
}
net_pattern() { yes "rhyve-virtio-net-$1-0123456789abcdef" | head -c "$2"; }
net_md5() { md5sum | cut -d' ' -f1; }
# tap0's counters (/proc/net/dev: this namespace's; /sys is the initial namespace's mount)
net_stats() {
    local l
    l=$(grep "^ *$NET_TAP:" /proc/net/dev | sed 's/^ *//')
    testbed_say "net-tap-stats$1=${l:-none}"
}

# net_cpu LABEL: CPU time so far (clock ticks) of the VMM process (all threads; gtime = time in
# L2) and of the whole of L1 (/proc/stat "cpu" line), to see where a transfer's time went.
net_cpu() {
    local label="$1" vpid st l1
    vpid=$(cat /tmp/testbed.vpid 2>/dev/null)
    st=$( [ -n "$vpid" ] && sed 's/^.*) //' "/proc/$vpid/stat" 2>/dev/null)
    l1=$(sed -n 's/^cpu  *//p' /proc/stat)
    # after "comm) ": field 3 is state, so utime/stime/gtime are words 12/13/41
    # shellcheck disable=SC2086
    set -- $st
    testbed_say "net-cpu.$label=vmm utime=${12:-?} stime=${13:-?} gtime=${41:-?} l1 ${l1}"
}

# net_bench_rx NAME: run by `nc -l -e` with the connection as stdin/stdout; reports on stderr.
net_bench_rx() {
    local t0 t1 n
    net_cpu rx-start >&2
    t0=$(net_now_us)
    n=$(dd bs=64k 2>/dev/null | wc -c)
    t1=$(net_now_us)
    net_cpu rx-end >&2
    echo "NET-BENCH $1 us=$((t1 - t0)) bytes=$n rc=0" >&2
}

# net_peer MODE MIB: L1's side of the exchange (run in the background while the VMM runs).
net_peer() {
    local mode="$1" mib="$2" bytes=$(($2 << 20)) got want out
    rm -f /tmp/net.hold /tmp/net.rx /tmp/net.tx
    mkfifo /tmp/net.hold
    net_cpu start
    if [ "$mode" = bench ]; then
        nc -l -p 5001 -e sh -c '. /testbed/testbed.sh; . /testbed/net.sh; net_bench_rx tcp-l2-to-l1'
        testbed_say "net-rx-done rc=$?"
    else
        # stdin: a FIFO nc holds open itself (busybox nc half-closes on stdin EOF, and its
        # peer then stops sending)
        nc -l -p 5001 <>/tmp/net.hold >/tmp/net.rx
        got=$(net_md5 </tmp/net.rx)
        testbed_say "net-rx bytes=$(wc -c </tmp/net.rx) md5=$got"
        if [ "$got" = "$(net_pattern l2-to-l1 "$bytes" | net_md5)" ]; then
            testbed_say "net-rx-data=match"
        else
            want=$(net_pattern l2-to-l1 "$(wc -c </tmp/net.rx)" | net_md5)
            [ "$got" = "$want" ] && testbed_say "net-rx-data=truncated" || testbed_say "net-rx-data=differs"
        fi
    fi
    net_cpu rx-done
    out=$(ping -c 3 -W 5 "$NET_L2" 2>&1)
    echo "$out" | sed 's/^/net-ping| /'
    case "$out" in
        *" 3 packets received"*) testbed_say "net-ping-l2=ok" ;;
        *) testbed_say "net-ping-l2=failed" ;;
    esac
    net_cpu tx-start
    if [ "$mode" = bench ]; then
        nc "$NET_L2" 5002 -e dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null
        testbed_say "net-tx-done rc=$?"
    else
        net_pattern l1-to-l2 "$bytes" >/tmp/net.tx
        testbed_say "net-tx bytes=$(wc -c </tmp/net.tx) md5=$(net_md5 </tmp/net.tx)"
        nc "$NET_L2" 5002 </tmp/net.tx
        testbed_say "net-tx-done rc=$?"
    fi
    net_cpu tx-done
    net_stats
    testbed_say "net-peer=done"
}

# net_scenario MODE MIB TIMEOUT: the whole L1 side: tap, then net_run with one virtio-net
# device on it.
net_scenario() {
    net_tap || return 1
    # shellcheck disable=SC2046
    net_run "$1" "$2" "$3" $(net_vmm_args)
}

# net_run MODE MIB TIMEOUT [VMM args...]: peer in the background (own process group), the VMM
# booting L2 with init.sh's parameters (and the VMM args), then the peer is waited for (10 s)
# or killed. Returns the VMM's exit status.
net_run() {
    local mode="$1" mib="$2" tmo="$3" peer i rc
    shift 3
    setsid sh -c '. /testbed/testbed.sh; . /testbed/net.sh; net_peer "$@"' peer "$mode" "$mib" \
        </dev/null &
    peer=$!
    testbed_boot --kernel "$L2_VMLINUX" \
        --append "console=ttyS0 quiet net_mode=$mode net_mib=$mib net_l1=$NET_L1 net_l2=$NET_L2" \
        --marker L2-INIT-REACHED --timeout "$tmo" -- "$@"
    rc=$?
    i=0
    while kill -0 "$peer" 2>/dev/null && [ $i -lt 40 ]; do
        sleep 0.25; i=$((i + 1))
    done
    if kill -0 "$peer" 2>/dev/null; then
        testbed_say "net-peer=killed"
        kill -KILL -- "-$peer" 2>/dev/null
    fi
    wait "$peer" 2>/dev/null
    net_stats .end
    return "$rc"
}
