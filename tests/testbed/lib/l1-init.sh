#!/bin/sh
# L1's /init (generated test bed; see tests/testbed/README.md).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/lib64
export HOME=/root TMPDIR=/tmp RHYVE_RUNDIR=/run/rhyve
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
. /testbed/env
. /testbed/testbed.sh
testbed_say "l1-init-ms=$(testbed_now_ms)"
testbed_say "l1-info=kernel $(uname -r), vmm $TESTBED_VMM, scenario $TESTBED_SCENARIO"

for m in irqbypass kvm; do
    insmod "/lib/modules/testbed/$m.ko" || testbed_say "insmod-failed=$m"
done
insmod /lib/modules/testbed/kvm-amd.ko nested=1 || testbed_say "insmod-failed=kvm-amd"
if [ -c /dev/kvm ]; then
    testbed_say "kvm=ok nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)"
else
    testbed_say "kvm=missing"
fi

cd /scenario
sh -c '. /testbed/testbed.sh; . /scenario/l1.sh'
rc=$?
testbed_say "l1-exit=$rc"
testbed_say "l1-done-ms=$(testbed_now_ms)"
testbed_say "done"
sync
poweroff -f
sleep 5
