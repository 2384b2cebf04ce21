#!/bin/sh
# L2's /init: report, then stay up while L1 reads the VMM's memory use (L1 then kills the VMM).
mount -t proc proc /proc
read -r up _ </proc/uptime
echo; echo "L2-INIT-REACHED kernel=$(uname -r) l2-uptime=${up}s"
while :; do sleep 60; done
