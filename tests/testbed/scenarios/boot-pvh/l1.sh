# Runs in L1 (busybox sh, testbed.sh already sourced): boot the uncompressed vmlinux via PVH.
testbed_boot --kernel "$L2_VMLINUX" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 120
