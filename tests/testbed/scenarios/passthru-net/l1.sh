# Runs in L1 (q35 with an Intel IOMMU, see l1-iommu): the harness's virtio-net function
# $TESTBED_PT_BDF (0000:00:05.0) is bound to vfio-pci and passed through to L2, whose own
# virtio_net drives it. Its QEMU hub's other port is L1's NIC $TESTBED_L1_NIC_BDF (0000:00:06.0,
# L1's virtio_net, 10.0.3.1/24 in L1's root namespace, which has no other network): L2 is
# 10.0.3.2/24 on eth0, and the virtio-net scenario's exchange runs between them (lib/net.sh's
# net_run and ../virtio-net/init.sh: pings both ways, 4 MiB of a known pattern each way over
# TCP, md5 at both ends). rhyve: `-S -s 4,passthru,B/S/F`; qemu (the baseline): vfio-pci.
testbed_vfio_bind "$TESTBED_PT_BDF" || exit 1
# L1's virtio_pci is loaded only now, and the function's driver_override keeps it vfio-pci's.
testbed_l1_nic 10.0.3.1/24 || exit 1
dmesg | grep -E 'DMAR: (IOMMU enabled|Intel\(R\) Virtualization)|vfio' | sed 's/^/l1-dmesg| /'
NET_TAP=$TESTBED_L1_NIC NET_L1=10.0.3.1 NET_L2=10.0.3.2
. /testbed/net.sh
case "$TESTBED_VMM" in
    rhyve) pt="-S -s 4,passthru,$TESTBED_PT_BSF"
           export RHYVE_LOG=info ;;  # its passthru lines: identity, MSI-X, BARs
    qemu) pt="-device vfio-pci,host=$TESTBED_PT_BDF" ;;
    *) testbed_say "passthru-net: --vmm $TESTBED_VMM not supported (the device has one owner)"
       exit 2 ;;
esac
# shellcheck disable=SC2086
net_run check 4 240 $pt
rc=$?
# After the VMM let go of it, the function is vfio-pci's again.
testbed_say "vfio-after=$(basename "$(readlink "/sys/bus/pci/devices/$TESTBED_PT_BDF/driver")")"
exit "$rc"
