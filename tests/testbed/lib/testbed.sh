# testbed.sh: helpers for a scenario's l1.sh (busybox ash, sourced before l1.sh runs in L1).
#
# Environment provided by the harness (see /testbed/env):
#   TESTBED_VMM        rhyve | qemu
#   TESTBED_VMM_BIN    the VMM binary inside L1
#   TESTBED_SCENARIO   scenario name
#   TESTBED_PT_BDF TESTBED_PT_BSF TESTBED_PT_DEVICE   with l1-iommu: the function to pass
#                      through (0000:00:05.0, 0/5/0, virtio-blk|virtio-net)
#   PT_IMAGE           virtio-blk: its image path on the host
#   TESTBED_PT_MAC TESTBED_L1_NIC_BDF TESTBED_L1_NIC_MAC   virtio-net: its MAC, and L1's own
#                      NIC on the same QEMU hub (0000:00:06.0; see testbed_l1_nic)
#   L2_VMLINUZ L2_VMLINUX L2_INITRD L2_KERNEL_VERSION
#
# Lines starting with "TESTBED: " are results the harness and bench/ read; L2's serial output
# is echoed as "L2| <line>", the VMM's stderr as "vmm-err| <line>" after the VMM exits.

# L1 uptime in ms (10 ms resolution, no fork).
testbed_now_ms() {
    local up rest
    read -r up rest </proc/uptime
    echo $(( ${up%.*} * 1000 + 10#${up#*.} * 10 ))
}

testbed_say() { echo "TESTBED: $*"; }

# testbed_boot [options] [-- extra VMM args]
#   --kernel PATH      L2 kernel (bzImage or PVH vmlinux)       (default $L2_VMLINUZ)
#   --initrd PATH      L2 initramfs                             (default $L2_INITRD)
#   --append STR       L2 command line                          (default "console=ttyS0 quiet")
#   --mem SIZE         guest memory, e.g. 512M                  (default 512M)
#   --name NAME        VM name for rhyve                        (default vm0)
#   --loaded           rhyve only: boot what rhyveload put into the named VM (no --kernel,
#                      --initrd, --append are passed)
#   --restore FILE     rhyve only: restore the snapshot FILE (+ FILE.kern) with -r FILE (no
#                      --kernel, --initrd, --append are passed; the extra args must give the
#                      snapshot's devices again)
#   --firmware ROM     boot through firmware ROM instead of a kernel: rhyve -l bootrom,ROM,
#                      QEMU -bios ROM (no --kernel, --initrd, --append are passed)
#   --vars FILE        with --firmware: the firmware's variable store, kept in FILE:
#                      rhyve -l bootrom,ROM,FILE, QEMU ROM and FILE as pflash0 and pflash1
#   --marker STR       line printed by L2's /init: its arrival time from VMM start is reported
#                      as "TESTBED: l2-init-ms=N"               (default L2-INIT-REACHED)
#   --timeout SECS     SIGKILL the VMM's process group after SECS (default 120)
#   --tag TAG          suffix for result keys: vmm-exit.TAG=... (default none)
#   --after-marker CMD run CMD (sh -c, with $TESTBED_VMM_PID set) once the marker was seen,
#                      e.g. to signal the VMM; prints "TESTBED: after-marker=CMD"
#   --signal-after-marker SIG   shorthand: --after-marker 'kill -SIG "$TESTBED_VMM_PID"'
#   --loaded           rhyve: no --kernel/--initrd/--append; run what rhyveload loaded into
#                      the VM object NAME
# Prints: TESTBED: vmm-cmd=..., TESTBED: l2-init-ms=N (if the marker was seen),
#         TESTBED: vmm-exit=N, TESTBED: vmm-ms=N (VMM start to exit), TESTBED: vmm-timeout
# Returns the VMM's exit status.
testbed_boot() {
    local kernel="$L2_VMLINUZ" initrd="$L2_INITRD" append="console=ttyS0 quiet" mem=512M
    local name=vm0 marker=L2-INIT-REACHED tmo=120 tag="" after="" loaded=0 firmware="" vars=""
    local restore=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --kernel) kernel="$2"; shift 2 ;;
            --initrd) initrd="$2"; shift 2 ;;
            --append) append="$2"; shift 2 ;;
            --mem) mem="$2"; shift 2 ;;
            --name) name="$2"; shift 2 ;;
            --loaded) loaded=1; shift ;;
            --restore) restore="$2"; shift 2 ;;
            --firmware) firmware="$2"; shift 2 ;;
            --vars) vars="$2"; shift 2 ;;
            --marker) marker="$2"; shift 2 ;;
            --timeout) tmo="$2"; shift 2 ;;
            --tag) tag=".$2"; shift 2 ;;
            --after-marker) after="$2"; shift 2 ;;
            --signal-after-marker) after="kill -$2 \"\$TESTBED_VMM_PID\""; shift 2 ;;
            --) shift; break ;;
            *) echo "testbed_boot: unknown option $1" >&2; return 2 ;;
        esac
    done
    # Build the VMM command line in "$@": extra args go last, except that rhyve's
    # VM name must stay the final argument.
    case "$TESTBED_VMM" in
        qemu)
            if [ -n "$restore" ]; then
                echo "testbed_boot: --restore is rhyve's (-r)" >&2; return 2
            elif [ -n "$vars" ]; then
                set -- "$TESTBED_VMM_BIN" -accel kvm -m "$mem" -nographic -vga none \
                    -no-reboot -nic none \
                    -drive "if=pflash,format=raw,readonly=on,file=$firmware" \
                    -drive "if=pflash,format=raw,file=$vars" "$@"
            elif [ -n "$firmware" ]; then
                set -- "$TESTBED_VMM_BIN" -accel kvm -m "$mem" -nographic -vga none \
                    -no-reboot -nic none -bios "$firmware" "$@"
            else
                set -- "$TESTBED_VMM_BIN" -accel kvm -m "$mem" -nographic -vga none \
                    -no-reboot -nic none -kernel "$kernel" -initrd "$initrd" \
                    -append "$append" "$@"
            fi ;;
        rhyve)
            if [ -n "$restore" ]; then
                set -- "$TESTBED_VMM_BIN" -m "$mem" -s 0,hostbridge -s 31,lpc -l com1,stdio \
                    -r "$restore" "$@" "$name"
            elif [ -n "$firmware" ]; then
                set -- "$TESTBED_VMM_BIN" -m "$mem" -s 0,hostbridge -s 31,lpc -l com1,stdio \
                    -l "bootrom,$firmware${vars:+,$vars}" "$@" "$name"
            elif [ "$loaded" = 1 ]; then
                # Run what rhyveload loaded into the VM object: no --kernel.
                set -- "$TESTBED_VMM_BIN" -m "$mem" -s 0,hostbridge -s 31,lpc -l com1,stdio \
                    "$@" "$name"
            else
                set -- "$TESTBED_VMM_BIN" -m "$mem" -s 0,hostbridge -s 31,lpc -l com1,stdio \
                    --kernel "$kernel" \
                    --initrd "$initrd" --append "$append" "$@" "$name"
            fi ;;
        *) echo "testbed_boot: unknown TESTBED_VMM=$TESTBED_VMM" >&2; return 2 ;;
    esac
    local q="" a
    for a in "$@"; do
        case "$a" in *[[:space:]]*|"") q="$q '$a'" ;; *) q="$q $a" ;; esac
    done
    testbed_say "vmm-cmd$tag=${q# }"
    rm -f /tmp/testbed.rc /tmp/testbed.err /tmp/testbed.timeout /tmp/testbed.vpid
    local t0 t1 rc
    t0=$(testbed_now_ms)
    # The VMM runs in its own session/process group (setsid execs in place: pid = pgid), so the
    # watchdog can SIGKILL it with every child that could hold the output pipe open.
    {
        setsid "$@" </dev/null 2>/tmp/testbed.err &
        local vpid=$! wpid
        echo "$vpid" >/tmp/testbed.vpid
        setsid sh -c 'sleep "$1"; : >/tmp/testbed.timeout; kill -KILL -- "-$2"' watchdog \
            "$tmo" "$vpid" </dev/null >/dev/null 2>&1 &
        wpid=$!
        wait "$vpid"
        echo $? >/tmp/testbed.rc
        kill -KILL -- "-$wpid" 2>/dev/null
    } | testbed__reader "$marker" "$t0" "$tag" "$after"
    t1=$(testbed_now_ms)
    rc=$(cat /tmp/testbed.rc 2>/dev/null || echo 255)
    if [ -s /tmp/testbed.err ]; then
        sed 's/^/vmm-err| /' /tmp/testbed.err
    fi
    [ -e /tmp/testbed.timeout ] && testbed_say "vmm-timeout$tag after ${tmo}s"
    testbed_say "vmm-exit$tag=$rc"
    testbed_say "vmm-ms$tag=$((t1 - t0))"
    return "$rc"
}

# Echo the VMM's stdout (L2's serial console) prefixed, and time the marker.
testbed__reader() {
    local marker="$1" t0="$2" tag="$3" after="$4" seen=0 line now cr
    cr=$(printf '\r')
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%"$cr"}
        if [ "$seen" = 0 ]; then
            case "$line" in
                *"$marker"*)
                    now=$(testbed_now_ms); seen=1
                    echo "L2| $line"
                    testbed_say "l2-init-ms$tag=$((now - t0))"
                    if [ -n "$after" ]; then
                        testbed_say "after-marker$tag=$after"
                        TESTBED_VMM_PID=$(cat /tmp/testbed.vpid 2>/dev/null) \
                            sh -c "$after" </dev/null
                    fi
                    continue ;;
            esac
        fi
        echo "L2| $line"
    done
}

# testbed_vfio_bind BDF   (a scenario with `l1-iommu`: L1 is q35 with an Intel IOMMU)
# Loads vfio's modules from /lib/modules/testbed (vfio_iommu_type1 with
# allow_unsafe_interrupts=1: the IOMMU has no interrupt remapping), unbinds BDF from any driver
# and binds it to vfio-pci (driver_override + drivers_probe). Prints
#   TESTBED: vfio-bind=ok group=N        (then the group's members and ls -l /dev/vfio), or
#   TESTBED: vfio-bind=fail reason=...
# Returns 0 when /dev/vfio/N exists and BDF's driver is vfio-pci.
testbed_vfio_bind() {
    local bdf="$1" dev="/sys/bus/pci/devices/$1" m f group drv
    for m in vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci; do
        f="/lib/modules/testbed/$m.ko"
        [ -e "$f" ] || continue  # vfio_virqfd: not a module of its own in every kernel
        [ -d "/sys/module/$(echo "$m" | tr - _)" ] && continue
        case "$m" in
            vfio_iommu_type1) insmod "$f" allow_unsafe_interrupts=1 ;;
            *) insmod "$f" ;;
        esac || { testbed_say "vfio-bind=fail reason=insmod-$m"; return 1; }
    done
    if [ ! -d "$dev" ]; then
        testbed_say "vfio-bind=fail reason=no-device bdf=$bdf"
        ls /sys/bus/pci/devices
        return 1
    fi
    testbed_say "vfio-dev=$bdf id=$(cat "$dev/vendor"):$(cat "$dev/device") class=$(cat "$dev/class")"
    if [ ! -e "$dev/iommu_group" ]; then
        testbed_say "vfio-bind=fail reason=no-iommu-group bdf=$bdf"
        dmesg | grep -iE 'dmar|iommu' | tail -n 20
        return 1
    fi
    group=$(basename "$(readlink "$dev/iommu_group")")
    if [ -e "$dev/driver" ]; then
        drv=$(basename "$(readlink "$dev/driver")")
        [ "$drv" = vfio-pci ] || echo "$bdf" >"$dev/driver/unbind"
    fi
    echo vfio-pci >"$dev/driver_override"
    echo "$bdf" >/sys/bus/pci/drivers_probe 2>/dev/null
    drv=$( [ -e "$dev/driver" ] && basename "$(readlink "$dev/driver")")
    if [ "$drv" != vfio-pci ] || [ ! -c "/dev/vfio/$group" ]; then
        testbed_say "vfio-bind=fail reason=probe driver=${drv:-none} group=$group"
        dmesg | grep -iE 'vfio|iommu|dmar' | tail -n 20
        return 1
    fi
    testbed_say "vfio-bind=ok group=$group"
    testbed_say "vfio-group-devices=$(ls "$dev/iommu_group/devices" | tr '\n' ' ')"
    ls -l /dev/vfio
}

# testbed_l1_nic ADDR/PREFIX   (l1-iommu with pt-device=virtio-net)
# L1's own NIC, TESTBED_L1_NIC_BDF: a virtio-net-pci on the same QEMU hub as the function to
# pass through (TESTBED_PT_BDF) and nothing else. Claims the pass-through function for vfio-pci
# first (driver_override, so that virtio_pci never binds it), loads virtio's modules from
# /lib/modules/testbed, gives the NIC's interface ADDR/PREFIX, brings it up and waits for its
# carrier. Sets TESTBED_L1_NIC (the interface name) and prints
#   TESTBED: l1-nic=IF bdf=BDF mac=MAC driver=DRV addr=ADDR/PREFIX carrier=N
#   TESTBED: l1-nic-pt-driver=DRV   (the pass-through function's: vfio-pci, or none)
# Returns 0 when the interface is up with carrier and virtio_pci did not take the function.
testbed_l1_nic() {
    local addr="$1" nic="/sys/bus/pci/devices/$TESTBED_L1_NIC_BDF" pt m i ifdir drv ptdrv
    pt="/sys/bus/pci/devices/$TESTBED_PT_BDF"
    [ -e "$pt/driver_override" ] && [ ! -e "$pt/driver" ] && echo vfio-pci >"$pt/driver_override"
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
             failover net_failover virtio_net; do
        [ -d "/sys/module/$m" ] && continue
        insmod "/lib/modules/testbed/$m.ko" ||
            { testbed_say "l1-nic=fail reason=insmod-$m"; return 1; }
    done
    ptdrv=$( [ -e "$pt/driver" ] && basename "$(readlink "$pt/driver")")
    testbed_say "l1-nic-pt-driver=${ptdrv:-none}"
    i=0
    while ! ifdir=$(ls -d "$nic"/virtio*/net/* 2>/dev/null) && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
    if [ -z "$ifdir" ]; then
        testbed_say "l1-nic=fail reason=no-interface bdf=$TESTBED_L1_NIC_BDF"
        ls /sys/class/net
        dmesg | grep -iE 'virtio|eth' | tail -n 20
        return 1
    fi
    TESTBED_L1_NIC=${ifdir##*/}
    drv=$( [ -e "$nic/driver" ] && basename "$(readlink "$nic/driver")")
    ip link set lo up
    ip addr add "$addr" dev "$TESTBED_L1_NIC"
    ip link set "$TESTBED_L1_NIC" up
    i=0
    while [ "$(cat "$ifdir/carrier" 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
    testbed_say "l1-nic=$TESTBED_L1_NIC bdf=$TESTBED_L1_NIC_BDF mac=$(cat "$ifdir/address") driver=${drv:-none} addr=$addr carrier=$(cat "$ifdir/carrier" 2>/dev/null)"
    [ "$(cat "$ifdir/carrier" 2>/dev/null)" = 1 ] && [ "$ptdrv" != virtio-pci ]
}
