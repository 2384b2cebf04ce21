# Runs in L1 (busybox sh, testbed.sh already sourced): two vCPUs and ACPI (bhyve -A -c 2).
# L1's clock is real time in UTC; rhyve's RTC is L1's local time (UTC here), so L2's RTC
# date must equal L1's UTC date, which L2 gets on its command line (l1date=).
l1date=$(date -u +%Y-%m-%d)
testbed_say "l1-date=$l1date"
case "$TESTBED_VMM" in
    rhyve)
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet l1date=$l1date" \
            --marker L2-INIT-REACHED --timeout 180 -- -A -c 2
        # `halt -f`: Linux stops the other CPU, then halts the boot CPU, all with interrupts
        # off -> every vCPU halted for good -> exit 2, as bhyve. (QEMU would just sit there.)
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet then=halt" \
            --marker L2-INIT-REACHED --timeout 120 --tag halt -- -A -c 2
        ;;
    qemu)
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet l1date=$l1date" \
            --marker L2-INIT-REACHED --timeout 180 -- -smp 2 ;;
esac
