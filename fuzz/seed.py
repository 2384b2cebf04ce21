#!/usr/bin/env python3
"""Seed inputs for the virtio_blk, virtio_net, virtio_pci and legacy_ports targets: the
layouts the unit tests' drivers use (valid requests of each kind), so the fuzzer starts
from traffic that gets deep into the device code. Run once: python3 seed.py"""
import os, struct

TAIL = 0x10000
NEXT, WRITE, INDIRECT = 1, 2, 4

def queue(chains, size_log=4, event_idx=False):
    """One queue in rhyve_fuzz::guest_queues' layout; chains: lists of (addr, len, flags)."""
    size = 1 << size_log
    table = bytearray(16 * size)
    heads, d = [], 0
    for chain in chains:
        heads.append(d)
        for i, (addr, ln, fl) in enumerate(chain):
            last = i == len(chain) - 1
            f = fl | (0 if last else NEXT)
            table[16 * d:16 * d + 16] = struct.pack("<QIHH", addr, ln, f, d + 1)
            d += 1
    avail = struct.pack("<H", len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    avail += b"\0" * (2 + 2 * size - len(avail))
    return bytes([size_log | (0x80 if event_idx else 0)]) + avail + bytes(table)

def tail(parts):
    """Bytes at TAIL: parts (offset from TAIL, bytes)."""
    out = bytearray(max(o + len(b) for o, b in parts))
    for o, b in parts:
        out[o:o + len(b)] = b
    return bytes(out)

def write(target, name, data):
    with open(os.path.join("corpus", target, "seed-" + name), "wb") as f:
        f.write(data)

# virtio-blk: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, unknown type.
def blk(typ, sector, data_len, data_write, payload=b""):
    hdr = struct.pack("<IIQ", typ, 0, sector)
    chain = [(TAIL, 16, 0)]
    if data_len:
        chain.append((TAIL + 0x100, data_len, WRITE if data_write else 0))
    chain.append((TAIL + 0x2000, 1, WRITE))
    return queue([chain]) + tail([(0, hdr), (0x100, payload or b"\0" * data_len), (0x2000, b"\xff")])

write("virtio_blk", "in", b"\x03" + blk(0, 2, 1024, True))
write("virtio_blk", "out", b"\x03" + blk(1, 4, 512, False, bytes(range(256)) * 2))
write("virtio_blk", "flush", b"\x00" + blk(4, 0, 0, False))
write("virtio_blk", "get_id", b"\x03" + blk(8, 0, 20, True))
write("virtio_blk", "discard", b"\x03" + blk(11, 0, 16, False, struct.pack("<QII", 8, 8, 0)))
write("virtio_blk", "zeroes", b"\x03" + blk(13, 0, 16, False, struct.pack("<QII", 16, 4, 1)))
write("virtio_blk", "unknown", b"\x03" + blk(99, 0, 0, False))

# virtio-net: a TX frame (header + Ethernet), a control command, RX buffers, a host frame.
VNET = 12
frame = b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x00" + bytes(46)
features = (1 << 17) | (1 << 16) | (1 << 18) | (1 << 2) | (1 << 0) | (1 << 7)
rxq = queue([[(TAIL + 0x3000, 1526, WRITE)]])
txq = queue([[(TAIL, VNET, 0), (TAIL + VNET, len(frame), 0)]])
ctrl = queue([[(TAIL + 0x1000, 2, 0), (TAIL + 0x1002, 1, 0), (TAIL + 0x1010, 1, WRITE)]], 2)
t = tail([(0, b"\0" * VNET + frame), (0x1000, b"\x00\x00\x01"), (0x3000, b"\0")])
host = b"\0" * VNET + frame
write("virtio_net", "tx_ctrl_rx", struct.pack("<Q", features) + bytes([len(host)]) + host
      + rxq + txq + ctrl + t)

# virtio-pci: a driver's bring-up of queue 0 (reset, ACK|DRIVER, features, FEATURES_OK,
# queue 0 size and addresses, enable, DRIVER_OK), then a notify; RAM holds one rng chain.
def op(target, off, width_log, value, read=False):
    return bytes([target | (0x80 if read else 0)]) + struct.pack("<HB", off, width_log) + struct.pack("<Q", value)

ram = bytearray(4096)
ram[0:16] = struct.pack("<QIHH", 0x800, 64, WRITE, 0)
ram[0x402:0x406] = struct.pack("<HH", 1, 0)
ops = b"".join([
    op(0, 0x14, 0, 0), op(0, 0x14, 0, 3), op(0, 0x08, 2, 1), op(0, 0x0c, 2, 1),
    op(0, 0x14, 0, 0x0b), op(0, 0x14, 0, 0, True), op(0, 0x16, 1, 0), op(0, 0x18, 1, 16),
    op(0, 0x20, 2, 0), op(0, 0x28, 2, 0x400), op(0, 0x30, 2, 0x600), op(0, 0x1c, 1, 1),
    op(0, 0x14, 0, 0x0f), op(0, 0x3000, 1, 0), op(0, 0x2000, 0, 0, True),
    op(2, 0x04, 1, 6), op(1, 0x00, 3, 0xfee00000), op(1, 0x08, 2, 0x41),
])
write("virtio_pci", "bringup", bytes(ram) + ops)

# legacy ports: UART init and output, RTC reads, i8042 commands, PM enable + press.
def rec(dev, off, width, wr, value):
    return bytes([dev, off, width, 0 if wr else 1]) + struct.pack("<I", value)
recs = b"".join([
    rec(0, 3, 1, True, 0x80), rec(0, 0, 1, True, 1), rec(0, 3, 1, True, 3), rec(0, 1, 1, True, 0x0f),
    rec(0, 0, 1, True, 0x41), rec(7, 0, 0, True, 0x61626364), rec(0, 5, 1, False, 0), rec(0, 0, 1, False, 0),
    rec(1, 0, 1, True, 0x0b), rec(1, 1, 1, False, 0), rec(1, 0, 1, True, 0x0a), rec(1, 1, 1, True, 0x80),
    rec(2, 4, 1, True, 0x20), rec(2, 0, 1, False, 0), rec(2, 4, 1, True, 0xfe),
    rec(3, 2, 2, True, 0x100), rec(3, 0, 2, False, 0), rec(3, 0, 2, True, 0x100),
    rec(4, 0, 2, True, 0x3400), rec(5, 0, 1, True, 6), rec(6, 0, 4, False, 0),
])
write("legacy_ports", "init", recs)
