#!/bin/sh
# L2's /init, reached through SeaBIOS -> GRUB (i386-pc, from the MBR of a virtio-blk disk).
mount -t proc proc /proc
read -r up _ </proc/uptime
echo; echo "L2-INIT-REACHED kernel=$(uname -r) l2-uptime=${up}s cmdline=$(cat /proc/cmdline)"
poweroff -f
