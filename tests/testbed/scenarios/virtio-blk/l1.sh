# Runs in L1: two disk images, L2 writes one and must be refused writing the other; then the
# image file itself is checked against the pattern L2 wrote.
dd if=/dev/zero of=/tmp/d.img bs=1M count=8 2>/dev/null
dd if=/dev/zero bs=1M count=1 2>/dev/null | tr '\000' '\253' >/tmp/ro.img
ro_md5=$(md5sum </tmp/ro.img | cut -d' ' -f1)
case "$TESTBED_VMM" in
    rhyve) disks="-s 3,virtio-blk,/tmp/d.img -s 4,virtio-blk,/tmp/ro.img,ro" ;;
    qemu) disks="-drive file=/tmp/d.img,if=virtio,format=raw -drive file=/tmp/ro.img,if=virtio,format=raw,readonly=on" ;;
esac
# shellcheck disable=SC2086
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 120 -- $disks
want=$(yes rhyve-pattern-0123456789 | head -c 8388608 | md5sum | cut -d' ' -f1)
got=$(md5sum </tmp/d.img | cut -d' ' -f1)
[ "$want" = "$got" ] && testbed_say "blk-image=match" || testbed_say "blk-image=differs want=$want got=$got"
[ "$(md5sum </tmp/ro.img | cut -d' ' -f1)" = "$ro_md5" ] && testbed_say "ro-image=unchanged" || testbed_say "ro-image=modified"
testbed_say "blk-image-md5=$got"
