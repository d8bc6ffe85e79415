"""Parse speed of ddump's file readers: pcap, pcapng and gzip, fed in read-sized chunks.

    python bench/parse_speed.py FILES... [--chunk 262144] [--runs 3]
    DDUMP_PURE_PYTHON=1 python bench/parse_speed.py FILES...   # the pure-Python engine

Each file is read into memory first (the disk is not timed), then fed to its parser (chosen by
ddump.pcapng_read.sniff; gzip is decompressed on the way, inside the timing) chunk by chunk, as
a file source would; the best of `--runs` runs is printed, in packets per second.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ddump import records
from ddump.compressed import GzipDecoder
from ddump.pcap import PcapStreamParser
from ddump.pcapng_read import PcapngStreamParser, sniff


def parse(data: bytes, chunk: int) -> int:
    """How many packets `data` holds, parsed chunk by chunk."""
    kind = sniff(data[:4])
    gzip = GzipDecoder() if kind == "gzip" else None
    if gzip is not None:
        kind = sniff(gzip.feed(data[:65536]))  # only to choose the parser; decoded again below
        gzip = GzipDecoder()
    count = 0
    pcap = PcapStreamParser() if kind == "pcap" else None
    pcapng = PcapngStreamParser() if kind == "pcapng" else None
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        if gzip is not None:
            piece = gzip.feed(piece)
        if pcap is not None:
            count += len(pcap.feed(piece))
        elif pcapng is not None:
            count += sum(len(batch) for _, batch in pcapng.feed(piece))
    if gzip is not None:
        gzip.close()
    if pcap is not None:
        pcap.close()
    if pcapng is not None:
        pcapng.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--chunk", type=int, default=256 * 1024)  # the file source's READ_SIZE
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"engine: {records.ENGINE}, chunk {args.chunk} bytes")
    for path in args.files:
        data = path.read_bytes()
        best = float("inf")
        count = 0
        for _ in range(args.runs):
            start = time.perf_counter()
            count = parse(data, args.chunk)
            best = min(best, time.perf_counter() - start)
        print(
            f"{path.name}: {count} packets in {best:.3f} s, "
            f"{count / best / 1e6:.2f} M packets/s, {len(data) / best / 2**20:.0f} MiB/s"
        )


if __name__ == "__main__":
    main()
