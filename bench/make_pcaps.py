"""Synthetic per-host captures for the merge benchmark: LINUX_SLL2, nanosecond, little-endian.

    python bench/make_pcaps.py DIR --streams 4 --packets 250000 --sizes imix [--shape S]

Shapes: `interleaved` (the default): one global clock ticks ~1 µs per packet; each packet goes
to a random stream, so every file is in capture order and the files interleave finely (the
worst case for a run-based merge). `rotated`: the files follow one another in time, as
`tcpdump -G`/`-C` leaves them. `uneven`: every file covers the same period, file i with i + 1
times the first one's packets (--packets is the mean). A small
fraction of packets (`--ties`) repeats the previous packet's timestamp, so ties between streams
are exercised too. Sizes are the captured length of the whole record (SLL2 header included):
IMIX is the classic 7:4:1 mix of 64, 594 and 1500 bytes. Every packet is IPv4/UDP whose payload
holds its stream and sequence number, so two merged outputs can be compared record by record.
"""

from __future__ import annotations

import argparse
import random
import struct
from pathlib import Path

LINKTYPE_LINUX_SLL2 = 276
GLOBAL = struct.Struct("<IHHiIII")
RECORD = struct.Struct("<IIII")
SLL2 = struct.Struct(">HHIHBB8s")  # protocol reserved ifindex hatype pkttype halen addr
IPV4_UDP = struct.Struct(">BBHHHBBH4s4sHHHH")
START_NS = 1_700_000_000_123_456_789
SIZES = {"imix": [64] * 7 + [594] * 4 + [1500], "64": [64], "1500": [1500]}


def packet(stream: int, seq: int, size: int) -> bytes:
    """An SLL2 + IPv4 + UDP packet of exactly `size` bytes, numbered in its payload."""
    sll2 = SLL2.pack(
        0x0800, 0, 2, 1, 4, 6, bytes([2, 0xDD, 0, 0, stream >> 8 & 0xFF, stream & 0xFF]) + b"\0\0"
    )
    body = b"ddump-bench %02d %08d " % (stream, seq)
    payload = body + b"." * (size - SLL2.size - IPV4_UDP.size - len(body))
    ip_len = IPV4_UDP.size + len(payload)
    src = bytes([198, 18, stream >> 8 & 0xFF, 1 + stream % 250])
    header = IPV4_UDP.pack(
        0x45, 0, ip_len, seq & 0xFFFF, 0, 64, 17, 0, src, bytes([198, 18, 0, 254]),
        40000 + stream, 5000, ip_len - 20, 0,
    )  # fmt: skip
    return sll2 + header + payload


def generate(outdir: Path, streams: int, packets: int, sizes: str, ties: float, seed: int) -> None:
    """Write `streams` files of `packets` packets each (s00.pcap, s01.pcap, ...)."""
    rng = random.Random(seed)
    outdir.mkdir(parents=True, exist_ok=True)
    header = GLOBAL.pack(0xA1B23C4D, 2, 4, 0, 0, 262144, LINKTYPE_LINUX_SLL2)
    chunks: list[list[bytes]] = [[header] for _ in range(streams)]
    remaining = [packets] * streams
    seqs = [0] * streams
    choices = SIZES[sizes]
    live = list(range(streams))
    ts = START_NS
    last_stream = -1
    while live:
        stream = live[rng.randrange(len(live))]
        # A tie only between different streams: one stream's own clock always moves on.
        if not (rng.random() < ties and stream != last_stream):
            ts += 500 + rng.randrange(1000)
        last_stream = stream
        data = packet(stream, seqs[stream], rng.choice(choices))
        sec, nsec = divmod(ts, 1_000_000_000)
        chunks[stream].append(RECORD.pack(sec, nsec, len(data), len(data)) + data)
        seqs[stream] += 1
        remaining[stream] -= 1
        if not remaining[stream]:
            live.remove(stream)
            last_stream = -1
    for stream, parts in enumerate(chunks):
        (outdir / f"s{stream:02d}.pcap").write_bytes(b"".join(parts))


def generate_shaped(
    outdir: Path, streams: int, packets: int, sizes: str, shape: str, seed: int
) -> None:
    """Rotated or uneven files (see the module's docstring), written one at a time."""
    rng = random.Random(seed)
    outdir.mkdir(parents=True, exist_ok=True)
    header = GLOBAL.pack(0xA1B23C4D, 2, 4, 0, 0, 262144, LINKTYPE_LINUX_SLL2)
    choices = SIZES[sizes]
    total = streams * packets
    weights = [1] * streams if shape == "rotated" else [i + 1 for i in range(streams)]
    counts = [total * w // sum(weights) for w in weights]
    span = total * 1000  # ns: ~1 µs per packet over the whole capture, as `interleaved`
    for stream, count in enumerate(counts):
        if shape == "rotated":
            start = START_NS + stream * span // streams
            stamps = sorted(start + rng.randrange(span // streams) for _ in range(count))
        else:
            stamps = sorted(START_NS + rng.randrange(span) for _ in range(count))
        parts = [header]
        for seq, ts in enumerate(stamps):
            data = packet(stream, seq, rng.choice(choices))
            sec, nsec = divmod(ts, 1_000_000_000)
            parts.append(RECORD.pack(sec, nsec, len(data), len(data)) + data)
        (outdir / f"s{stream:04d}.pcap").write_bytes(b"".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--packets", type=int, default=250_000, help="per stream")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="imix")
    parser.add_argument("--ties", type=float, default=0.01, help="fraction of equal timestamps")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--shape", choices=("interleaved", "rotated", "uneven"))
    args = parser.parse_args()
    if args.shape in ("rotated", "uneven"):
        generate_shaped(args.outdir, args.streams, args.packets, args.sizes, args.shape, args.seed)
    else:
        generate(args.outdir, args.streams, args.packets, args.sizes, args.ties, args.seed)


if __name__ == "__main__":
    main()
