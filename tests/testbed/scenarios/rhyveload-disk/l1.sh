# Runs in L1: rhyveload finds the kernel, initramfs and command line in the Debian-style disk
# image (grub.cfg's default entry on an ext4 partition), loads them into the named VM vm0, and
# rhyve boots it with the same image as its virtio-blk disk; L2's initramfs mounts /dev/vda1
# and runs the root filesystem's /sbin/init, which reports and powers off.
disk=/scenario-data/disk.img
case "$TESTBED_VMM" in
    rhyve)
        rhyveload -m 512M -d "$disk" vm0 >/tmp/rhyveload.out 2>&1
        rc=$?
        sed 's/^/RHYVELOAD-OUT| /' /tmp/rhyveload.out
        testbed_say "rhyveload-exit=$rc"
        [ "$rc" = 0 ] || exit 1
        testbed_boot --loaded --marker ROOTFS-INIT-REACHED --timeout 120 -- \
            -s 3,virtio-blk,"$disk"
        ls /run/rhyve/vm0 >/dev/null 2>&1 && testbed_say "vm-object=kept" || testbed_say "vm-object=gone"
        ;;
    qemu)
        cmdline="root=/dev/vda1 ro console=ttyS0 quiet rhyve.entry=debian-default"
        testbed_boot --kernel /scenario-data/vmlinuz --initrd /scenario-data/initrd.img \
            --append "$cmdline" --marker ROOTFS-INIT-REACHED --timeout 120 -- \
            -drive file="$disk",if=virtio,format=raw
        ;;
esac
