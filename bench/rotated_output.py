"""Compressed and rotated output: `ddump -w x.pcap.gz` (and .zst) against `mergecap | gzip -1`,
and what rotation (-C) costs against one plain file.

    .venv/bin/python bench/rotated_output.py [--runs 5] [--streams 4] [--packets 100000]

Synthetic captures (make_pcaps.py, IMIX) are merged by each command in turn, each writing a
file in the work directory (removed after every run); whole processes are timed, with their
CPU time from wait4() (a shell pipeline's includes both of its commands). Reported: medians, as
packets per second, and each command's CPU time against ddump's with a plain `-w x.pcap`.
The outputs are checked once: the gzip files hold the same capture, and the rotated files read
in order are the plain file.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergecap import TIMEOUT_S, Run, ddump_argv, timed  # noqa: E402


def commands(ddump: list[str], files: list[str], out: Path) -> dict[str, list[str]]:
    joined = " ".join(shlex.quote(f) for f in files)
    return {
        "ddump -w x.pcap": [*ddump, "-q", *files, "-w", f"{out}/plain.pcap"],
        "ddump -w x.pcap -C 10": [*ddump, "-q", *files, "-w", f"{out}/c.pcap", "-C", "10"],
        "ddump -w x.pcapng": [*ddump, "-q", *files, "-w", f"{out}/plain.pcapng"],
        "ddump -w x.pcapng -C 10": [*ddump, "-q", *files, "-w", f"{out}/c.pcapng", "-C", "10"],
        "ddump -w x.pcap.gz": [*ddump, "-q", *files, "-w", f"{out}/x.pcap.gz"],
        "ddump -w x.pcap.zst": [*ddump, "-q", *files, "-w", f"{out}/x.pcap.zst"],
        "mergecap | gzip -1": [
            "sh",
            "-c",
            f"mergecap -F nsecpcap -w - {joined} | gzip -1 > {out}/m.pcap.gz",
        ],
    }


def check(out: Path) -> str:
    plain = (out / "plain.pcap").read_bytes()
    same_gz = gzip.decompress((out / "x.pcap.gz").read_bytes()) == plain
    zstd = subprocess.run(["zstd", "-dc", str(out / "x.pcap.zst")], capture_output=True)
    same_zst = zstd.stdout == plain
    (out / "m.pcap").write_bytes(gzip.decompress((out / "m.pcap.gz").read_bytes()))
    compare = [sys.executable, str(HERE / "compare_pcaps.py"), str(out / "plain.pcap")]
    compared = subprocess.run(
        [*compare, str(out / "m.pcap")], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    same_mergecap = compared.returncode == 0  # equal, but for the order of equal timestamps
    numbered = [p for p in out.glob("c.pcap*") if p.name[6:].isdigit() or p.name == "c.pcap"]
    parts = sorted(numbered, key=lambda p: int(p.name[6:] or 0))
    body = b"".join(p.read_bytes()[24:] for p in parts)
    return (
        f"x.pcap.gz = plain: {same_gz}; x.pcap.zst = plain: {same_zst}; "
        f"mergecap|gzip = plain (ties in any order): {same_mergecap}; "
        f"{len(parts)} files of -C 10 = plain: {body == plain[24:]}; "
        f"gzip sizes: ddump {(out / 'x.pcap.gz').stat().st_size / 1e6:.1f} MB, "
        f"gzip -1 {(out / 'm.pcap.gz').stat().st_size / 1e6:.1f} MB, "
        f"zstd {(out / 'x.pcap.zst').stat().st_size / 1e6:.1f} MB, "
        f"plain {len(plain) / 1e6:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--packets", type=int, default=100_000, help="per stream")
    parser.add_argument("--ddump", type=shlex.split, default=ddump_argv())
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ddump-bench-rot-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    try:
        data = workdir / "in"
        subprocess.run(
            [sys.executable, str(HERE / "make_pcaps.py"), str(data), "--streams",
             str(args.streams), "--packets", str(args.packets), "--sizes", "imix"],
            check=True, timeout=TIMEOUT_S, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        files = sorted(str(p) for p in data.glob("*.pcap"))
        out = workdir / "out"
        out.mkdir()
        argvs = commands(args.ddump, files, out)
        for argv in argvs.values():  # warm-up, and the outputs to check
            timed(argv, env, TIMEOUT_S)
        found = check(out)
        runs: dict[str, list[Run]] = {name: [] for name in argvs}
        for _ in range(args.runs):
            for name, argv in argvs.items():
                for old in out.iterdir():
                    old.unlink()
                os.sync()
                runs[name].append(timed(argv, env, TIMEOUT_S))
        total = args.streams * args.packets
        base_cpu = statistics.median(r.cpu_s for r in runs["ddump -w x.pcap"])
        print(f"{total:,} packets ({args.streams} x {args.packets:,}, IMIX), {args.runs} runs")
        print("| command | pkt/s (wall) | wall s | CPU s (each run) | CPU vs ddump -w x.pcap |")
        print("|---|---:|---:|---:|---:|")
        for name, measured in runs.items():
            wall = statistics.median(r.wall_s for r in measured)
            cpu = statistics.median(r.cpu_s for r in measured)
            spread = " ".join(f"{r.cpu_s:.2f}" for r in measured)
            print(
                f"| `{name}` | {total / wall:,.0f} | {wall:.3f} | {cpu:.3f} ({spread}) "
                f"| {cpu / base_cpu:.2f} |"
            )
        print(f"\nchecked: {found}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
