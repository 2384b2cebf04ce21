#!/bin/sh
# L2's /init, reached through OVMF -> GRUB (EFI system partition on virtio-blk): what Linux
# learnt from the ACPI tables OVMF installed from fw_cfg's table loader, and a UEFI variable
# in the VARSFILE: set on the first boot, found again on the second. Then power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
read -r up _ </proc/uptime
echo; echo "L2-INIT-REACHED kernel=$(uname -r) l2-uptime=${up}s nproc=$(nproc) cmdline=$(cat /proc/cmdline)"
echo "L2-ACPI-TABLES $(ls /sys/firmware/acpi/tables | tr '\n' ' ')"
dmesg | grep -E 'efi: EFI v|ACPI: (RSDP|XSDT|FACP|DSDT|FACS|APIC|MCFG)|ACPI.*(Error|Warning)|[Cc]hecksum|smp: Brought' |
    sed 's/^/L2-DMESG /'
insmod /lib/modules/efivarfs.ko
mount -t efivarfs efivarfs /sys/firmware/efi/efivars
# A vendor GUID of our own; attributes 7 = non-volatile, boot service and runtime access.
var=/sys/firmware/efi/efivars/RhyveTest-5c2f8e1a-7b3d-4e69-9a0c-1d4b6f8e2a37
if [ -f "$var" ]; then
    echo "L2-EFIVAR-FOUND value=$(tail -c +5 "$var")"
else
    value=$(cat /proc/sys/kernel/random/uuid)
    # efivarfs wants attributes and data in one write.
    printf '\007\000\000\000%s' "$value" >"$var" && echo "L2-EFIVAR-SET value=$value"
fi
poweroff -f
