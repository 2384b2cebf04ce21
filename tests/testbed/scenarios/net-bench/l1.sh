# Runs in L1: TCP throughput between L2 (virtio-net) and L1 (its tap), 64 MiB each way, timed by
# the receiver. Same setup and L2 /init as the virtio-net scenario (lib/net.sh, init.sh).
. /testbed/net.sh
net_enter_netns /scenario/l1.sh
net_scenario bench 64 420
