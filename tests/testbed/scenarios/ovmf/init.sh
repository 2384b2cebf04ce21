#!/bin/sh
# L2's /init, reached through OVMF -> GRUB (EFI system partition on virtio-blk).
mount -t proc proc /proc
read -r up _ </proc/uptime
echo; echo "L2-INIT-REACHED kernel=$(uname -r) l2-uptime=${up}s cmdline=$(cat /proc/cmdline)"
poweroff -f
