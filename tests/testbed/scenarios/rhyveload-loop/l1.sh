# Runs in L1: bhyve's reboot loop with rhyveload (bhyveload) and rhyve on a stock kernel.
# The guest's boot files live in a host directory (rhyveload -h), Debian-style symlinks.
if [ "$TESTBED_VMM" = rhyve ]; then
    mkdir -p /tmp/guest/boot
    cp "$L2_VMLINUZ" "/tmp/guest/boot/vmlinuz-$L2_KERNEL_VERSION"
    cp "$L2_INITRD" "/tmp/guest/boot/initrd.img-$L2_KERNEL_VERSION"
    ln -s "boot/vmlinuz-$L2_KERNEL_VERSION" /tmp/guest/vmlinuz
    ln -s "boot/initrd.img-$L2_KERNEL_VERSION" /tmp/guest/initrd.img
    round=1
    while rhyveload -m 512M -h /tmp/guest -e "cmdline=console=ttyS0 quiet rl.round=$round" vm0 &&
          testbed_boot --loaded --tag "r$round" --timeout 120 -- -D; do
        round=$((round + 1))
        [ "$round" -le 3 ] || break
    done
    testbed_say "loop-rounds=$round"
    if [ -e /run/rhyve/vm0 ]; then testbed_say "object=left"; else testbed_say "object=gone"; fi
else
    # Baseline: the powering-off round, booted directly.
    testbed_boot --append "console=ttyS0 quiet rl.round=2" --timeout 120
fi
