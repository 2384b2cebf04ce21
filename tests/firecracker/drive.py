#!/usr/bin/env python3
"""Drives rhyve in Firecracker mode with firecracker-python's API client (PyPI), as an
orchestrator would: configure, start, pause/resume, Ctrl-Alt-Del. Used by
tests/tests/firecracker.rs; prints one `step NAME ok` line per step, JSON answers as
`answer NAME JSON`, and exits non-zero on the first failure.

usage: drive.py SOCKET SCENARIO KERNEL [key=value ...]
  SCENARIO net:    machine-config, boot-source, a root drive (drive=PATH), a network
                   interface (tap=NAME), InstanceStart; then waits for stdin lines:
                   `pause`, `resume`, `limit-rx`, `unlimit-rx`, `state`, `quit`.
  SCENARIO ctrlaltdel: machine-config and boot-source, InstanceStart, then the same
                   commands plus `ctrlaltdel`.
"""
import json
import sys

from firecracker.api import Api


def main():
    sock, scenario, kernel = sys.argv[1:4]
    opts = dict(a.split("=", 1) for a in sys.argv[4:])
    api = Api(sock)
    info = api.describe.get().json()
    print("answer describe " + json.dumps(info), flush=True)
    api.machine_config.put(vcpu_count=int(opts.get("cpus", "1")), mem_size_mib=128)
    print("step machine-config ok", flush=True)
    api.boot.put(kernel_image_path=kernel, boot_args=opts["boot_args"])
    print("step boot-source ok", flush=True)
    if scenario == "net":
        api.drive.put(drive_id="rootfs", path_on_host=opts["drive"],
                      is_root_device=True, is_read_only=False)
        print("step drive ok", flush=True)
        api.network.put(iface_id="eth0", host_dev_name=opts["tap"],
                        guest_mac="06:00:ac:10:00:02")
        print("step network ok", flush=True)
    config = api.vm_config.get().json()
    print("answer vm-config " + json.dumps(config), flush=True)
    api.actions.put(action_type="InstanceStart")
    print("step start ok", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "pause":
            api.vm.patch(state="Paused")
        elif cmd == "resume":
            api.vm.patch(state="Resumed")
        elif cmd == "limit-rx":
            # One frame a second into the guest.
            api.network.patch(iface_id="eth0",
                              rx_rate_limiter={"ops": {"size": 1, "refill_time": 1000}})
        elif cmd == "unlimit-rx":
            # A zero size turns the bucket off.
            api.network.patch(iface_id="eth0",
                              rx_rate_limiter={"ops": {"size": 0, "refill_time": 0}})
        elif cmd == "ctrlaltdel":
            api.actions.put(action_type="SendCtrlAltDel")
        elif cmd == "state":
            print("answer state " + api.describe.get().json()["state"], flush=True)
            continue
        elif cmd == "quit":
            break
        print(f"step {cmd} ok", flush=True)
    api.close()


if __name__ == "__main__":
    main()
