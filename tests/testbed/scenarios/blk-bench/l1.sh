# Runs in L1: a 128 MiB raw image in L1's /tmp (ramfs: buffered I/O only, for both VMMs), one
# virtio-blk disk; L2 (init.sh) times dd with O_DIRECT against it.
dd if=/dev/zero of=/tmp/d.img bs=1M count=128 2>/dev/null
case "$TESTBED_VMM" in
    rhyve) disks="-s 3,virtio-blk,/tmp/d.img" ;;
    qemu) disks="-drive file=/tmp/d.img,if=virtio,format=raw,aio=threads" ;;
esac
# shellcheck disable=SC2086
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 400 -- $disks
