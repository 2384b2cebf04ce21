#!/bin/sh
# L2's /init: find the ACPI power button's input device, wait on it, then power off
# (with pb=ignore on the command line: ignore it, so the VMM has to force the power-off).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in evdev button; do
    insmod "/lib/modules/$m.ko" || echo "L2-INSMOD-FAILED $m"
done
ev=""
for d in /sys/class/input/event*; do
    [ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] && ev="/dev/input/${d##*/}"
done
echo; echo "L2-POWER-BUTTON-DEVICE ${ev:-none} ($(cat /sys/class/input/*/device/name 2>/dev/null | tr '\n' ',' ))"
if [ -z "$ev" ]; then
    echo "L2-NO-POWER-BUTTON"
    poweroff -f
fi
# One struct input_event (24 bytes on x86-64): the key press.
dd if="$ev" of=/tmp/ev bs=24 count=1 2>/dev/null &
sleep 1
echo; echo "L2-WAITING-FOR-POWER-BUTTON"
wait
# type (EV_KEY=1), code (KEY_POWER=116=0x74), value (1: pressed), little-endian.
echo; echo "L2-POWER-BUTTON event=$(od -An -tx1 -j16 -N8 /tmp/ev | tr -s ' \n' ' ')"
echo "L2-SCI $(grep -i acpi /proc/interrupts | tr -s ' ')"
if grep -q 'pb=ignore' /proc/cmdline; then
    # A guest that ignores the button: the VMM must force the power-off.
    echo "L2-POWER-BUTTON-IGNORED"
    sleep 600
fi
poweroff -f
sleep 10
echo "L2-POWEROFF-FAILED"
