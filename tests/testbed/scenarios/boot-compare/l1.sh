# Runs in L1 with both VMMs (run-scenario --vmm both): the same stock kernel, initramfs and
# command line booted to L2's /init by rhyve, QEMU pc and QEMU microvm, bzImage and PVH, in
# alternating order for ROUNDS rounds. Each boot reports l2-init-ms.TAG (VMM start -> /init)
# and, at /init, the VMM's own resident memory (rss-own-kb.TAG); then the VMM is killed.
# TAG = VMM-KERNEL-ROUND, VMM in rhyve|pc|microvm, KERNEL in bz|pvh. Read by bench/ (boot).
ROUNDS=3
APPEND="console=ttyS0 quiet"

boot() { # boot VMM KERNEL ROUND
    local kernel="$L2_VMLINUZ" tag="$1-$2-$3"
    [ "$2" = pvh ] && kernel="$L2_VMLINUX"
    local after="sh /scenario/rss.sh \"\$TESTBED_VMM_PID\" $tag; kill -KILL \"\$TESTBED_VMM_PID\""
    case "$1" in
        rhyve)
            TESTBED_VMM=rhyve TESTBED_VMM_BIN="$TESTBED_RHYVE_BIN"
            testbed_boot --kernel "$kernel" --append "$APPEND" --timeout 120 --tag "$tag" \
                --name "cmp$3" --after-marker "$after"
            # Killed, so its (ephemeral) VM object and RAM file are left: remove them.
            rm -rf "/run/rhyve/cmp$3" ;;
        pc|microvm)
            TESTBED_VMM=qemu TESTBED_VMM_BIN="$TESTBED_QEMU_BIN"
            testbed_boot --kernel "$kernel" --append "$APPEND" --timeout 120 --tag "$tag" \
                --after-marker "$after" -- -M "$1" ;;
    esac
}

round=1
while [ "$round" -le "$ROUNDS" ]; do
    for k in bz pvh; do
        if [ $((round % 2)) = 1 ]; then
            order="rhyve pc microvm"
        else
            order="microvm pc rhyve"
        fi
        for v in $order; do boot "$v" "$k" "$round"; done
    done
    round=$((round + 1))
done
testbed_say "boot-compare-rounds=$ROUNDS"
true
