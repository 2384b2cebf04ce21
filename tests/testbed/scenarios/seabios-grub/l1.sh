# Runs in L1 (busybox sh, testbed.sh sourced): SeaBIOS boots the disk's MBR (GRUB i386-pc),
# GRUB reads grub.cfg, the stock kernel and L2's initramfs through int 13h (SeaBIOS's own
# virtio-blk driver) and boots them; L2 reaches /init and powers off. With --vmm both, rhyve
# and QEMU boot the same disk with the same SeaBIOS, one after the other (the bench's
# firmware boot comparison).
DISK=/scenario-data/bios-disk.img
BIOS=/usr/share/seabios/bios-256k.bin
boot() { # boot rhyve|qemu
    case "$1" in
        rhyve) TESTBED_VMM=rhyve TESTBED_VMM_BIN="$TESTBED_RHYVE_BIN"
            set -- -s 2,virtio-blk,$DISK ;;
        qemu) TESTBED_VMM=qemu TESTBED_VMM_BIN="$TESTBED_QEMU_BIN"
            set -- -drive file=$DISK,if=none,id=d0,format=raw \
                -device virtio-blk-pci,drive=d0,disable-legacy=on ;;
    esac
    testbed_boot --firmware "$BIOS" --mem 512M --name bios --tag "$TESTBED_VMM" \
        --marker L2-INIT-REACHED --timeout 300 -- "$@"
}
case "$TESTBED_VMM" in
    both) boot rhyve; boot qemu ;;
    *) boot "$TESTBED_VMM" ;;
esac
true
