#!/bin/sh
# Not used: this scenario boots the initramfs rhyveload finds on the disk (prepare-host).
echo "L2-WRONG-INITRAMFS"
poweroff -f
