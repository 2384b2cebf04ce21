# Runs in L1 (busybox sh, testbed.sh sourced): OVMF (-l bootrom / -bios) finds the GPT disk
# on virtio-blk with its own virtio driver, runs GRUB from the EFI system partition, which
# loads the stock kernel and L2's initramfs from it; L2 reaches /init and powers off.
DISK=/scenario-data/ovmf-disk.img
case "$TESTBED_VMM" in
    rhyve) set -- -s 2,virtio-blk,$DISK -l debugcon,/tmp/ovmf-debug.log ;;
    qemu) set -- -drive file=$DISK,if=none,id=d0,format=raw \
        -device virtio-blk-pci,drive=d0,disable-legacy=on ;;
esac
testbed_boot --firmware /usr/share/ovmf/OVMF.fd --mem 512M --name uefi \
    --marker L2-INIT-REACHED --timeout 300 -- "$@"
# OVMF's own log (rhyve: its debug console at 0x402): what it says about ACPI and errors.
[ -f /tmp/ovmf-debug.log ] && grep -aiE "error|warn|acpi|table|loader|assert" /tmp/ovmf-debug.log |
    head -80 | sed 's/^/ovmf| /'
true
