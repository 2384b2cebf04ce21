# Runs in L1 (busybox sh, testbed.sh already sourced): boot the stock Debian bzImage.
testbed_boot --kernel "$L2_VMLINUZ" --append "console=ttyS0 quiet" \
    --marker L2-INIT-REACHED --timeout 120
