# Runs in L1 (q35 with an Intel IOMMU, see l1-iommu): QEMU's edu device $TESTBED_PT_BDF
# (0000:00:05.0, MSI only) is bound to vfio-pci and passed through to L2, with a virtio-rng
# next to it whose MSI-X config vector lends edu its message (init.sh, msit.c).
# rhyve: `-S -s 4,passthru,B/S/F` (rhyve's emulated one-vector MSI capability, VFIO's MSI
# trigger as an irqfd); qemu (the baseline): vfio-pci.
testbed_vfio_bind "$TESTBED_PT_BDF" || exit 1
dmesg | grep -E 'DMAR: (IOMMU enabled|Intel\(R\) Virtualization)|vfio' | sed 's/^/l1-dmesg| /'
case "$TESTBED_VMM" in
    rhyve) pt="-S -s 4,passthru,$TESTBED_PT_BSF -s 6,virtio-rnd"
           export RHYVE_LOG=info ;;
    qemu) pt="-device vfio-pci,host=$TESTBED_PT_BDF,addr=4 -device virtio-rng-pci,addr=6" ;;
    *) testbed_say "passthru-msi: --vmm $TESTBED_VMM not supported (the device has one owner)"
       exit 2 ;;
esac
# shellcheck disable=SC2086
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 180 -- $pt
rc=$?
testbed_say "vfio-after=$(basename "$(readlink "/sys/bus/pci/devices/$TESTBED_PT_BDF/driver")")"
exit "$rc"
