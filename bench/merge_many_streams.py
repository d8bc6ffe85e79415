"""The merge's cost per chunk with many sparse live streams (pure code, no sockets).

    .venv/bin/python bench/merge_many_streams.py [--streams 256,1024] [--rate 10]
                                                 [--seconds 10] [--before DIR]

Each of N live streams sends `rate` records per second, each record in its own chunk (what
a quiet capture in immediate mode gives). Per chunk the CLI pushes it, asks for the
watermark and releases (ddump/cli/session.py does this per chunk); here over `--seconds` of
simulated time, with the max delay 250 ms. Printed: CPU per chunk and the share of records
written late (there should be none). --before DIR times ddump/merge.py of another revision
(a copy of its tree) the same way, in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ddump import merge as current  # noqa: E402

MS = 1_000_000
MAX_DELAY_NS = 250 * MS


def load_merge(root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("merge_before", root / "ddump/merge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def arrivals(streams: int, rate: int, seconds: float) -> list[tuple[int, int]]:
    """(time ns, stream) of every record: each stream at `rate`/s, at random phases."""
    rng = random.Random(1)
    gap = 1_000_000_000 // rate
    events = []
    for stream in range(streams):
        t = rng.randrange(gap)
        while t < seconds * 1e9:
            events.append((t, stream))
            t += gap + rng.randrange(-gap // 10, gap // 10)
    events.sort()
    return events


def run(module: ModuleType, streams: int, events: list[tuple[int, int]]) -> tuple[float, float]:
    """(CPU us per chunk, late share) of one merge of `events`."""
    merger = module.Merger()
    for index in range(streams):
        merger.add_stream(str(index))
        merger.start_stream(index)
    start = time.process_time()
    late = 0
    for now, stream in events:
        # A record arrives 1 ms after its capture (at 1 s + now); the clock is the simulated one.
        late += len(merger.push(stream, [(now + 1_000 * MS, b"x" * 64)]))
        merger.release(merger.watermark(now + 1_001 * MS, MAX_DELAY_NS))
    used = time.process_time() - start
    return used / len(events) * 1e6, late / len(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="256,1024")
    parser.add_argument("--rate", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--before", type=Path, help="a copy of the revision to compare with")
    args = parser.parse_args()
    variants = [("after", current)]
    if args.before is not None:
        variants.insert(0, ("before", load_merge(args.before)))
    print("| code | streams | chunks/s | merge CPU us per chunk | one core's chunks/s | late |")
    print("|---|---:|---:|---:|---:|---:|")
    for streams in [int(n) for n in args.streams.split(",")]:
        events = arrivals(streams, args.rate, args.seconds)
        for name, module in variants:
            per_chunk, late = run(module, streams, events)
            print(
                f"| {name} | {streams:,} | {streams * args.rate:,} | {per_chunk:.1f} "
                f"| {1e6 / per_chunk:,.0f} | {100 * late:.2f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
