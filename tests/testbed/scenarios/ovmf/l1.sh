# Runs in L1 (busybox sh, testbed.sh sourced): OVMF (code as -l bootrom, a copy of its
# variable store as the VARSFILE; QEMU: pflash0/pflash1) finds the GPT disk on virtio-blk with
# its own virtio driver, runs GRUB from the EFI system partition, which loads the stock kernel
# and L2's initramfs from it; L2 reaches /init, sets a UEFI variable and powers off. The second
# boot, on the same VARSFILE, must find the variable. With --vmm both, rhyve and QEMU do this
# one after the other (the bench's OVMF boot comparison).
DISK=/scenario-data/ovmf-disk.img
CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
boot() { # boot rhyve|qemu: two boots on a fresh copy of the variable store
    local vars=/tmp/ovmf-vars-$1.fd boot
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$vars"
    case "$1" in
        rhyve) TESTBED_VMM=rhyve TESTBED_VMM_BIN="$TESTBED_RHYVE_BIN"
            set -- -c 2 -s 2,virtio-blk,$DISK -l debugcon,/tmp/ovmf-debug.log ;;
        qemu) TESTBED_VMM=qemu TESTBED_VMM_BIN="$TESTBED_QEMU_BIN"
            set -- -smp 2 -drive file=$DISK,if=none,id=d0,format=raw \
                -device virtio-blk-pci,drive=d0,disable-legacy=on ;;
    esac
    for boot in first second; do
        testbed_boot --firmware "$CODE" --vars "$vars" --mem 512M --name uefi \
            --tag "$TESTBED_VMM-$boot" --marker L2-INIT-REACHED --timeout 300 -- "$@"
    done
    # What OVMF programmed through the flash reached the file.
    cmp -s "$vars" /usr/share/OVMF/OVMF_VARS_4M.fd && testbed_say "vars-file.$TESTBED_VMM=unchanged" ||
        testbed_say "vars-file.$TESTBED_VMM=changed"
}
case "$TESTBED_VMM" in
    both) boot rhyve; boot qemu ;;
    *) boot "$TESTBED_VMM" ;;
esac
# OVMF's own log (rhyve: its debug console at 0x402; Debian's release build says little).
[ -f /tmp/ovmf-debug.log ] && grep -aiE "error|warn|acpi|flash|assert" /tmp/ovmf-debug.log |
    head -60 | sed 's/^/ovmf| /'
true
