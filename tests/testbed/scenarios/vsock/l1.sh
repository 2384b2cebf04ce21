# Runs in L1: one virtio-vsock device (guest CID 3) for L2's stock vsock driver; 1 MiB each
# way, both directions at the same time, every byte checked (see init.sh for L2's half, and
# vsockt.c, the tool at both ends, built by prepare-host).
#   rhyve: Firecracker's host side on unix sockets: -s 5,virtio-vsock,cid=3,path=/tmp/vsock.sock.
#     host-initiated: `vsockt uds-connect` writes "CONNECT 5000\n" to /tmp/vsock.sock, reads
#       "OK N\n" (retrying while L2's listener is not up yet), sends, half-closes, reads the echo
#       to EOF; guest-initiated: L2's connect to CID 2 port 6000 reaches /tmp/vsock.sock_6000,
#       where `vsockt uds-echo` echoes it.
#   qemu (baseline): vhost-vsock-pci with L1's own vhost_vsock: the same two transfers over
#     AF_VSOCK in L1 (`vsockt -r send 3 5000`, `vsockt echo-server 6000`).
T=/scenario-data/vsockt
BYTES=1048576
case "$TESTBED_VMM" in
    rhyve)
        rm -f /tmp/vsock.sock /tmp/vsock.sock_6000
        $T -w 200 -t 90 uds-echo /tmp/vsock.sock_6000 6000 $BYTES </dev/null &
        gpid=$!
        $T -w 200 -t 90 uds-connect /tmp/vsock.sock 5000 $BYTES </dev/null &
        hpid=$!
        i=0
        while [ ! -S /tmp/vsock.sock_6000 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        set -- -s 5,virtio-vsock,cid=3,path=/tmp/vsock.sock ;;
    qemu)
        for m in vsock vmw_vsock_virtio_transport_common vhost_iotlb vhost vhost_vsock; do
            insmod /scenario-data/modules/$m.ko || testbed_say "insmod-failed=$m"
        done
        $T -w 200 -t 90 echo-server 6000 1 $BYTES </dev/null &
        gpid=$!
        $T -r -w 200 -t 90 send 3 5000 $BYTES </dev/null &
        hpid=$!
        set -- -device vhost-vsock-pci,guest-cid=3 ;;
    *) testbed_say "vsock-vmm=unsupported $TESTBED_VMM"; exit 1 ;;
esac
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 240 -- "$@"
# L1's two peers: done by now, or given 10 s (each is bounded by its own -w/-t as well).
i=0
while { kill -0 $gpid 2>/dev/null || kill -0 $hpid 2>/dev/null; } && [ $i -lt 40 ]; do
    sleep 0.25; i=$((i + 1))
done
kill -0 $gpid 2>/dev/null && { testbed_say "vsock-guest-initiated=killed"; kill -KILL $gpid; }
kill -0 $hpid 2>/dev/null && { testbed_say "vsock-host-initiated=killed"; kill -KILL $hpid; }
wait $gpid; grc=$?
wait $hpid; hrc=$?
testbed_say "vsock-guest-initiated-peer rc=$grc"
testbed_say "vsock-host-initiated-peer rc=$hrc"
[ "$grc" = 0 ] && [ "$hrc" = 0 ]
