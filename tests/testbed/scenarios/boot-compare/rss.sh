#!/bin/sh
# rss.sh PID TAG: the VMM's resident memory while L2 sits at /init, from /proc/PID/smaps,
# split into guest RAM (mappings of 256 MiB or more: the 512 MiB RAM block) and everything
# else (the VMM's own: code, heap, stacks, libraries), in KiB.
awk -v tag="$2" '
$1 == "Size:" { big = ($2 >= 262144) }
$1 == "Rss:" { if (big) guest += $2; else own += $2 }
END { printf "TESTBED: rss-own-kb.%s=%d\nTESTBED: rss-guest-kb.%s=%d\n", tag, own, tag, guest }
' "/proc/$1/smaps"
