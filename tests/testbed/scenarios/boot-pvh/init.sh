#!/bin/sh
# L2's /init: report, then reset through the keyboard controller (reboot -f).
mount -t proc proc /proc
read -r up _ </proc/uptime
echo; echo "L2-INIT-REACHED kernel=$(uname -r) l2-uptime=${up}s"
reboot -f
sleep 10
echo "L2-REBOOT-FAILED"
