# Runs in L1 (q35 with an Intel IOMMU, see l1-iommu): the harness's virtio-blk function
# $TESTBED_PT_BDF (0000:00:05.0, its image $PT_IMAGE on the host, nothing in L1 drives it) is
# bound to vfio-pci and passed through to L2, whose own virtio_blk writes and reads it.
# rhyve: bhyve's syntax, `-S` (wired memory, as bhyve's passthru requires) and
# `-s 4,passthru,B/S/F` with the function as L1 sees it; qemu (the baseline): vfio-pci.
# rhyve's refusals (one line, exit 4): the function before vfio-pci has it, and while another
# process holds its group.
pt_refused() {
    "$TESTBED_VMM_BIN" -m 64M -s 0,hostbridge -s "4,passthru,$TESTBED_PT_BSF" \
        --kernel "$L2_VMLINUX" vm-refused </dev/null >/dev/null 2>/tmp/pt-refused.err
    testbed_say "pt-refused-$1 rc=$? lines=$(wc -l </tmp/pt-refused.err): $(head -n 1 /tmp/pt-refused.err)"
}
[ "$TESTBED_VMM" = rhyve ] && pt_refused unbound
testbed_vfio_bind "$TESTBED_PT_BDF" || exit 1
if [ "$TESTBED_VMM" = rhyve ]; then
    group=$(basename "$(readlink "/sys/bus/pci/devices/$TESTBED_PT_BDF/iommu_group")")
    exec 3<>"/dev/vfio/$group"
    pt_refused busy
    exec 3>&-
    export RHYVE_LOG=info
fi
dmesg | grep -E 'DMAR: (IOMMU enabled|Intel\(R\) Virtualization)|vfio' | sed 's/^/l1-dmesg| /'
case "$TESTBED_VMM" in
    rhyve) pt="-S -s 4,passthru,$TESTBED_PT_BSF" ;;
    qemu) pt="-device vfio-pci,host=$TESTBED_PT_BDF" ;;
    *) testbed_say "passthru-blk: --vmm $TESTBED_VMM not supported (the device has one owner)"
       exit 2 ;;
esac
# shellcheck disable=SC2086
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 180 -- $pt
rc=$?
# Again with pci=nomsi: L2's virtio_pci falls back to the function's INTx.
# shellcheck disable=SC2086
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet pci=nomsi" \
    --marker L2-INIT-REACHED --timeout 180 --tag intx -- $pt
[ $rc = 0 ] && rc=$?
# After the VMM let go of it, the device is vfio-pci's again and its group is free.
testbed_say "vfio-after=$(basename "$(readlink "/sys/bus/pci/devices/$TESTBED_PT_BDF/driver")")"
exit "$rc"
