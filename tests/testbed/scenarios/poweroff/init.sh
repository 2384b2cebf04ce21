#!/bin/sh
# L2's /init: report, then power off through ACPI S5 (SLP_TYP 5 | SLP_EN in PM1a_CNT).
mount -t proc proc /proc
echo; echo "L2-INIT-REACHED kernel=$(uname -r)"
poweroff -f
sleep 10
echo "L2-POWEROFF-FAILED"
