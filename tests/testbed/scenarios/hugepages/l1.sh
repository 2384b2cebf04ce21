# Runs in L1, rhyve only: the same PVH boot to L2's /init with guest RAM on huge pages
# (memory.hugepages=on) and on 4 KiB pages (off), alternating for 2 rounds. At /init it
# reports the nested-paging faults KVM fixed for the VM (debugfs pf_fixed: KVM's global
# stats are sums over the VMs alive, and only this one is) and rhyve's minor page faults,
# then kills the VM. Read by bench/ (boot::run_hugepages).
mount -t debugfs none /sys/kernel/debug 2>/dev/null
for round in 1 2; do
    for hp in on off; do
        tag="$hp-$round"
        TESTBED_VMM=rhyve TESTBED_VMM_BIN="$TESTBED_RHYVE_BIN" testbed_boot \
            --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" --timeout 120 \
            --tag "$tag" --name "hp$tag" \
            --after-marker "echo \"TESTBED: npt-faults.$tag=\$(cat /sys/kernel/debug/kvm/pf_fixed)\"; echo \"TESTBED: host-minflt.$tag=\$(awk '{ print \$10 }' /proc/\$TESTBED_VMM_PID/stat)\"; kill -KILL \$TESTBED_VMM_PID" \
            -- -o memory.hugepages=$hp
        # Killed, so its ephemeral VM object is left: remove it.
        rm -rf "/run/rhyve/hp$tag"
    done
done
true
