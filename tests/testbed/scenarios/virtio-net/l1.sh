# Runs in L1: a tap in a network namespace of its own, one virtio-net device on it; L2 pings
# and is pinged, and 8 MiB of a known pattern go each way over TCP (busybox nc). See
# lib/net.sh (L1's half) and init.sh (L2's half).
. /testbed/net.sh
net_enter_netns /scenario/l1.sh
net_scenario check 8 240
