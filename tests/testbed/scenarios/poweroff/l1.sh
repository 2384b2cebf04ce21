# Runs in L1 (busybox sh, testbed.sh already sourced): L2 powers itself off.
# rhyve: ACPI S5 -> exit 1 (bhyve); QEMU with -no-reboot: exit 0.
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 120
