# Runs in L1 (busybox sh, testbed.sh already sourced): once L2 waits on its power button's
# input device, press the button.
# rhyve: SIGTERM -> ACPI fixed-feature power button (PM1 PWRBTN_STS, SCI); L2 powers off
# through S5 -> exit 1. QEMU exits on SIGTERM, so it gets `system_powerdown` on a monitor
# pipe instead (-no-reboot: exit 0).
case "$TESTBED_VMM" in
    rhyve)
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
            --marker L2-WAITING-FOR-POWER-BUTTON --timeout 120 --signal-after-marker TERM
        # A guest ignoring the button: -o power.grace forces the power-off, ...
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet pb=ignore" \
            --marker L2-WAITING-FOR-POWER-BUTTON --timeout 120 --signal-after-marker TERM \
            --tag grace -- -o power.grace=2
        # ... and so does a second SIGTERM.
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet pb=ignore" \
            --marker L2-WAITING-FOR-POWER-BUTTON --timeout 120 --tag second \
            --after-marker 'kill -TERM "$TESTBED_VMM_PID"; sleep 3; kill -TERM "$TESTBED_VMM_PID"'
        ;;
    qemu)
        mkfifo /tmp/mon.in /tmp/mon.out
        cat /tmp/mon.out >/dev/null &
        testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
            --marker L2-WAITING-FOR-POWER-BUTTON --timeout 120 \
            --after-marker 'echo system_powerdown >/tmp/mon.in' -- -monitor pipe:/tmp/mon ;;
esac
