# Runs in L1 (q35 with an Intel IOMMU, see l1-iommu): the harness's virtio-blk function
# $TESTBED_PT_BDF (0000:00:05.0, its image $PT_IMAGE on the host, nothing in L1 drives it) is
# bound to vfio-pci and passed through to L2, whose own virtio_blk writes and reads it.
# rhyve: bhyve's syntax, `-S` (wired memory, as bhyve's passthru requires) and
# `-s 4,passthru,B/S/F` with the function as L1 sees it; qemu (the baseline): vfio-pci.
testbed_vfio_bind "$TESTBED_PT_BDF" || exit 1
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
# After the VMM let go of it, the device is vfio-pci's again and its group is free.
testbed_say "vfio-after=$(basename "$(readlink "/sys/bus/pci/devices/$TESTBED_PT_BDF/driver")")"
exit "$rc"
