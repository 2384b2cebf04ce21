//! The real-KVM test bed (QEMU TCG machine with an emulated AMD SVM CPU, kvm_amd inside):
//! rhyve boots stock Debian Linux there to its /init. See tests/testbed/README.md.

use std::path::Path;
use std::process::Command;

fn scenario(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed");
    let bin = rhyve_tests::harness::rhyve_bin();
    let status = Command::new(root.join("run-scenario"))
        .arg(root.join("scenarios").join(name))
        .args(["--vmm", "rhyve"])
        .env("RHYVE_BIN", &bin)
        .status()
        .expect("run tests/testbed/run-scenario (needs python3, qemu-system-x86; .ci/run installs them)");
    assert!(
        status.success(),
        "test-bed scenario {name} failed (log under target/testbed/)"
    );
}

#[test]
fn stock_linux_boots_to_init_bzimage() {
    scenario("boot-bzimage");
}

#[test]
fn stock_linux_boots_to_init_pvh() {
    scenario("boot-pvh");
}

#[test]
fn stock_linux_drives_virtio_blk() {
    scenario("virtio-blk");
}

/// Linux's virtio_net on rhyve's virtio-net, tap0 in a network namespace of L1's: link up, ping
/// both ways, 8 MiB over TCP each way with bytes and md5 checked on both ends.
#[test]
fn stock_linux_drives_virtio_net() {
    scenario("virtio-net");
}

#[test]
fn stock_linux_powers_off_with_exit_1() {
    scenario("poweroff");
}

#[test]
fn stock_linux_sees_the_power_button() {
    scenario("power-button");
}

#[test]
fn stock_linux_brings_up_two_cpus_with_acpi() {
    scenario("smp");
}

#[test]
fn rhyveload_boots_a_debian_style_disk() {
    scenario("rhyveload-disk");
}

#[test]
fn stock_linux_in_the_rhyveload_reboot_loop() {
    scenario("rhyveload-loop");
}

/// SeaBIOS runs iPXE from virtio-net's expansion ROM; iPXE's own virtio driver gets a lease
/// from dnsmasq on L1's tap, fetches its script, the stock kernel and the initramfs over
/// TFTP, and that kernel reaches /init and powers off through the fw_cfg-provided ACPI.
#[test]
fn seabios_and_ipxe_netboot_stock_linux() {
    scenario("ipxe");
}

/// SeaBIOS boots GRUB (i386-pc) from a virtio-blk disk's MBR; GRUB reads the stock kernel and
/// initramfs through int 13h (SeaBIOS's virtio-blk driver); Linux reaches /init and powers off
/// through the ACPI tables fw_cfg handed the firmware.
#[test]
fn seabios_and_grub_boot_stock_linux_from_virtio_blk() {
    scenario("seabios-grub");
}

/// OVMF (code as the boot ROM, its variable store as the VARSFILE) boots GRUB from an EFI
/// system partition on virtio-blk with its own drivers; the stock kernel it loads finds both
/// CPUs and the FADT through the tables OVMF installed from fw_cfg's table loader, stores a
/// UEFI variable, powers off through ACPI; the second boot on the same VARSFILE finds it.
#[test]
fn ovmf_boots_stock_linux_and_keeps_uefi_variables() {
    scenario("ovmf");
}

/// Linux's vsock driver (vmw_vsock_virtio_transport) on rhyve's virtio-vsock with Firecracker's
/// unix-socket host side: 1 MiB each way at once, host-initiated (CONNECT/OK on the socket,
/// half-close) and guest-initiated (to `<path>_6000`), every byte checked on both ends, and a
/// refused connect to a port nothing listens on.
#[test]
fn stock_linux_talks_vsock_both_ways() {
    scenario("vsock");
}

/// Stock Linux with virtio-blk and virtio-net, mid-workload (writes read back and md5-checked,
/// pings): suspended (rhyve exits 0), restored by a second rhyve process, checkpointed and
/// killed, restored by a third from that checkpoint; the workload ends with every round's
/// data as written and Linux never booted again.
#[test]
fn stock_linux_survives_suspend_restore_checkpoint_kill_restore() {
    scenario("snapshot");
}

/// PCI passthrough in the bed with an IOMMU (q35 + intel-iommu L1): L1's virtio-blk function,
/// bound to vfio-pci, is given to L2 with `-s 4,passthru,0/5/0`; stock Linux's virtio_blk
/// writes and reads it with O_DIRECT (DMA into L2's RAM through the IOMMU, MSI-X vectors as
/// irqfds, its virtio BAR a KVM slot), then again with pci=nomsi over its INTx; the image file
/// on the host holds the pattern. rhyve's refusals (not vfio-pci's, group in use) are checked
/// first.
#[test]
fn stock_linux_drives_a_passed_through_virtio_blk_function() {
    scenario("passthru-blk");
}

/// A passed-through NIC: L1's virtio-net function (on a QEMU hub shared only with L1's own
/// NIC) given to L2 with `-s 4,passthru,0/5/0`; stock Linux's virtio_net pings L1 both ways and
/// moves 4 MiB each way over TCP, md5-checked at both ends, over MSI-X.
#[test]
fn stock_linux_drives_a_passed_through_virtio_net_function() {
    scenario("passthru-net");
}

/// Plain MSI through passthrough: QEMU's edu device (MSI, no MSI-X) passed to L2; L2 programs
/// rhyve's one-vector MSI capability with a message its kernel counts (a virtio-rng's config
/// vector) and raises edu's interrupt 20 times: each arrives (VFIO's MSI trigger is the
/// irqfd of that message's GSI).
#[test]
fn a_passed_through_function_s_msi_reaches_the_guest() {
    scenario("passthru-msi");
}
