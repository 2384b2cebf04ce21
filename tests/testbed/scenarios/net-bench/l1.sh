# Runs in L1: TCP throughput between L2 (virtio-net) and L1 (its tap), each way, timed by the
# sender. Same setup and L2 /init as the virtio-net scenario (lib/net.sh, init.sh), zeros.
. /testbed/net.sh
net_enter_netns /scenario/l1.sh
net_scenario bench 64 900
