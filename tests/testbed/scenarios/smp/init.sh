#!/bin/sh
# L2's /init: what the kernel learnt of CPUs, ACPI, the PM timer, the RTC and COM1; then
# `reboot -f` (or `halt -f` with then=halt on the command line).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo; echo "L2-INIT-REACHED kernel=$(uname -r) nproc=$(nproc)"
if grep -q 'then=halt' /proc/cmdline; then
    echo "L2-HALTING"
    halt -f
    sleep 10
    echo "L2-HALT-FAILED"
fi
dmesg | grep -E 'smp: |smpboot: |ACPI: (RSDP|XSDT|FACP|DSDT|FACS|APIC|MCFG)|ACPI.*(Error|error|Warning)|[Cc]hecksum|clocksource|PM-Timer|rtc_cmos|ttyS0|ACPI BIOS' |
    sed 's/^/L2-DMESG /'
l1date=$(sed -n 's/.*l1date=\([0-9-]*\).*/\1/p' /proc/cmdline)
rtcdate=$(cat /sys/class/rtc/rtc0/date 2>/dev/null)
echo "L2-DATE l1=$l1date rtc=$rtcdate sys=$(date -u +%Y-%m-%d)"
if [ -n "$rtcdate" ] && [ "$rtcdate" = "$l1date" ]; then echo "L2-RTC-DATE-MATCHES"; fi
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
