# Runs in L1 (rhyve only): stock Linux with virtio-blk (a disk file in L1) and virtio-net (tap0
# in a network namespace of its own) runs init.sh's workload and is
#   1. suspended mid-workload (rhyvectl --suspend: rhyve exits 0),
#   2. restored by a second rhyve process, which is checkpointed later on and then killed,
#   3. restored by a third process from that checkpoint (a restore of a restored VM), which
#      runs the workload to its end: every round's data must read back as written.
. /testbed/net.sh
net_enter_netns /scenario/l1.sh
net_tap || exit 1
export RHYVE_LOG=info
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
devices="-s 2,virtio-blk,/tmp/disk.img $(net_vmm_args)"
# shellcheck disable=SC2086
testbed_boot --mem 256M --append "console=ttyS0 quiet snap_rounds=24" \
    --marker "L2-SNAP-ROUND 6 " --tag boot --timeout 240 \
    --after-marker 'rhyvectl --vm=vm0 --suspend=/tmp/snap1' -- $devices
testbed_say "snap1-files=$(ls /tmp/snap1 /tmp/snap1.kern 2>&1 | tr '\n' ' ')"
testbed_say "snap1-size=$(du -k /tmp/snap1 | cut -f1)K state=$(wc -c </tmp/snap1.kern)"
# shellcheck disable=SC2086
testbed_boot --mem 256M --restore /tmp/snap1 \
    --marker "L2-SNAP-ROUND 14 " --tag restore1 --timeout 240 \
    --after-marker 'rhyvectl --vm=vm0 --checkpoint=/tmp/snap2 && kill -KILL "$TESTBED_VMM_PID"' \
    -- $devices
rhyvectl --vm=vm0 --destroy >/dev/null 2>&1
# shellcheck disable=SC2086
testbed_boot --mem 256M --restore /tmp/snap2 \
    --marker "L2-SNAP-DONE" --tag restore2 --timeout 240 -- $devices
