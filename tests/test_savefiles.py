"""Rotated and gzip output end to end: the real CLI, capture files or stdin in, real readers out.

Every check compares the files, read one after another, with the same merge written to one
plain file, record by record; and every file must open in tshark and capinfos on its own.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddump.pcap import PcapStreamParser
from tests.conftest import require_root, require_tool
from tests.fake_worker import pcap_stream, sll2_packet
from tests.test_pcapng import epb_fields, walk

OLD = 1_600_000_000 * 10**9  # capture files are merged by their timestamps alone
BLOCK_EPB = 6
BLOCK_ISB = 5


def run_ddump(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ddump.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def inputs(
    tmp_path: Path, streams: int = 3, packets: int = 3000, *, noise: bool = False
) -> list[str]:
    """Capture files of numbered packets, interleaved, on two interfaces each, sizes varied;
    with `noise`, padded with random bytes that gzip cannot shrink."""
    paths = []
    rng = random.Random(17)
    for s in range(streams):
        path = tmp_path / f"in{s}.pcap"
        frames = []
        for i in range(packets):
            data = b"%d-%d" % (s, i) * (1 + i % 40)
            if noise:
                data += rng.randbytes(200)
            frames.append((OLD + i * streams + s, sll2_packet(data, 1 + i % 2)))
        path.write_bytes(pcap_stream(frames))
        paths.append(str(path))
    return paths


def opened(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        return bytes(reader.read())
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def records(path: Path) -> list[tuple[int, ...] | tuple[int, bytes]]:
    """A pcap's (timestamp, record), or a pcapng's (interface, timestamp, packet) per EPB."""
    data = opened(path)
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        return [epb_fields(body) for kind, body in walk(data) if kind == BLOCK_EPB]
    parser = PcapStreamParser()
    found = parser.feed(data)
    parser.close()
    return list(found)


def assert_readable(path: Path) -> int:
    """tshark and capinfos open the file without a complaint; returns its packet count."""
    shown = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in shown.stderr.splitlines() if "Running as user" not in line]
    assert shown.returncode == 0 and not complaints, (path, shown.stderr)
    info = subprocess.run(["capinfos", "-c", str(path)], capture_output=True, text=True)
    assert info.returncode == 0, (path, info.stderr)
    return len(shown.stdout.split())


def numbered_files(directory: Path, name: str) -> list[Path]:
    """name, name1, name2, ... in the order they were written."""
    found = [p for p in directory.iterdir() if p.name.startswith(name)]
    suffix = [p.name[len(name) :] for p in found]
    return [p for _, p in sorted(zip([int(s or 0) for s in suffix], found, strict=True))]


@pytest.mark.parametrize(
    "name", ["cut.pcap", "cut.pcapng", "cut.pcap.gz", "cut.PCAPNG.GZ", "cut.pcapng.zst"]
)
def test_files_cut_by_size_are_the_merged_capture_packet_by_packet(
    tmp_path: Path, name: str
) -> None:
    require_tool("tshark")
    sources = inputs(tmp_path)
    whole = tmp_path / ("whole" + name[3:])
    out = tmp_path / "out"
    out.mkdir()

    plain = run_ddump(*sources, "-w", str(whole))
    cut = run_ddump(*sources, "-w", str(out / name), "-C", "0.2")

    assert plain.returncode == 0 and cut.returncode == 0, cut.stderr
    files = numbered_files(out, name)
    assert len(files) >= 5
    assert [f.name for f in files[:3]] == [name, name + "1", name + "2"]
    assert [r for f in files for r in records(f)] == records(whole)
    for f in files:
        assert assert_readable(f) == len(records(f)) > 0
        if name.lower().endswith("pcap") or name.endswith("pcapng"):  # before compression
            assert f.stat().st_size <= 200_000 + 20_000  # at most one record past the size
    assert f"9000 packets written to {len(files)} files, the last {out / files[-1].name}" in (
        cut.stderr
    )


def test_each_pcapng_file_has_every_interface_seen_so_far_and_statistics_at_its_end(
    tmp_path: Path,
) -> None:
    sources = inputs(tmp_path)
    out = tmp_path / "ng.pcapng"

    result = run_ddump(*sources, "-w", str(out), "-C", "0.3")

    assert result.returncode == 0, result.stderr
    files = numbered_files(tmp_path, "ng.pcapng")
    delivered = [0] * 6
    for f in files:
        blocks = walk(f.read_bytes())
        kinds = [kind for kind, _ in blocks]
        assert kinds[0] == 0x0A0D0D0A and kinds[1:7] == [1] * 6  # 3 targets x 2 interfaces
        assert kinds[-6:] == [BLOCK_ISB] * 6
        for _, body in blocks:
            if len(body) > 20 and _ == BLOCK_EPB:
                delivered[struct.unpack_from("<I", body)[0]] += 1
        # isb_usrdeliv: packets written up to the file's end, per interface (option code 8)
        for _, body in blocks[-6:]:
            interface = struct.unpack_from("<I", body)[0]
            at = body.index(struct.pack("<HH", 8, 8), 12)
            assert struct.unpack_from("<Q", body, at + 4)[0] == delivered[interface]
    assert sum(delivered) == 9000


def test_a_ring_keeps_exactly_n_files_the_newest_and_touches_nothing_else(
    tmp_path: Path,
) -> None:
    sources = inputs(tmp_path)
    whole = tmp_path / "whole.pcap"
    ring = tmp_path / "ring"
    ring.mkdir()
    (ring / "r.pcap7").write_bytes(b"not part of a ring of 4")
    (ring / "r.pcap.notes").write_bytes(b"mine")

    assert run_ddump(*sources, "-w", str(whole)).returncode == 0
    result = run_ddump(*sources, "-w", str(ring / "r.pcap"), "-C", "0.1", "-W", "4")

    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in ring.iterdir())
    assert names == ["r.pcap.notes", "r.pcap0", "r.pcap1", "r.pcap2", "r.pcap3", "r.pcap7"]
    assert (ring / "r.pcap7").read_bytes() == b"not part of a ring of 4"
    assert (ring / "r.pcap.notes").read_bytes() == b"mine"
    # The newest file is the last written; the ring, oldest first, is the end of the capture.
    total = int(result.stderr.split(" files,")[0].rsplit(" ", 1)[1])
    last = int(result.stderr.split(", the last ")[1].split()[0][-1])
    assert last == (total - 1) % 4 and total > 8
    order = [ring / f"r.pcap{(last + 1 + i) % 4}" for i in range(4)]
    kept = [r for f in order for r in records(f)]
    assert kept == records(whole)[-len(kept) :]
    for f in order:
        assert_readable(f)


def test_z_runs_on_each_finished_file_without_a_shell(tmp_path: Path) -> None:
    sources = inputs(tmp_path, packets=1000)
    log = tmp_path / "done.log"
    script = tmp_path / "on-done"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {log}\n')
    script.chmod(0o755)
    out = tmp_path / "a b;$(touch pwned).pcap"  # no shell ever sees this name

    result = run_ddump(*sources, "-w", str(out), "-C", "0.1", "-z", str(script))

    assert result.returncode == 0, result.stderr
    files = numbered_files(tmp_path, out.name)
    assert sorted(log.read_text().splitlines()) == sorted(str(f) for f in files)
    assert len(files) >= 3
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_z_gzip_compresses_every_file_readably(tmp_path: Path) -> None:
    sources = inputs(tmp_path, packets=1000)

    result = run_ddump(*sources, "-w", str(tmp_path / "z.pcap"), "-C", "0.1", "-z", "gzip")

    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("z.pcap"))
    assert names and all(n.endswith(".gz") for n in names), names
    for name in names:
        assert_readable(tmp_path / name)


def test_a_failing_z_command_is_reported_and_not_fatal(tmp_path: Path) -> None:
    sources = inputs(tmp_path, packets=1000)

    result = run_ddump(*sources, "-w", str(tmp_path / "f.pcap"), "-C", "0.1", "-z", "false")

    files = numbered_files(tmp_path, "f.pcap")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("failed (exit status 1); the file is kept as it is") == len(files)
    assert f"-z false {tmp_path / 'f.pcap1'} failed" in result.stderr
    assert sum(len(records(f)) for f in files) == 3000


def test_gzip_output_is_read_by_tshark_capinfos_mergecap_and_tcpdump_through_zcat(
    tmp_path: Path,
) -> None:
    require_tool("mergecap")
    tcpdump = require_tool("tcpdump")
    sources = inputs(tmp_path)
    out = tmp_path / "x.pcap.gz"

    assert run_ddump(*sources, "-w", str(tmp_path / "plain.pcap")).returncode == 0
    result = run_ddump(*sources, "-w", str(out))

    assert result.returncode == 0, result.stderr
    assert gzip.decompress(out.read_bytes()) == (tmp_path / "plain.pcap").read_bytes()
    assert assert_readable(out) == 9000
    merged = tmp_path / "merged.pcap"
    subprocess.run(["mergecap", "-F", "nsecpcap", "-w", str(merged), str(out)], check=True)
    assert records(merged) == records(out)
    # libpcap (tcpdump) reads no compressed file itself: through zcat it reads it whole.
    piped = subprocess.run(
        f"zcat {out} | {tcpdump} -nr - 2>/dev/null | wc -l", shell=True, capture_output=True
    )
    assert int(piped.stdout) == 9000


def slow_source(count: int, every_s: float) -> Iterator[bytes]:
    """A pcap stream for stdin: its header, then numbered packets stamped now, one at a time."""
    yield pcap_stream([])
    for i in range(count):
        yield pcap_stream([(time.time_ns(), sll2_packet(b"live-%d" % i))])[24:]
        time.sleep(every_s)


def feed(args: list[str], count: int, every_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", *args, "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=False,
    )
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        for chunk in slow_source(count, every_s):
            proc.stdin.write(chunk)
            proc.stdin.flush()
    return proc  # type: ignore[return-value]


def test_time_rotation_tiles_the_run_and_w_stops_after_n_files(tmp_path: Path) -> None:
    template = str(tmp_path / "t-%H%M%S.pcap")
    log = tmp_path / "done.log"
    script = tmp_path / "slow-on-done"
    script.write_text(f'#!/bin/sh\nsleep 2\nprintf "%s\\n" "$1" >> {log}\n')
    script.chmod(0o755)

    # Up to 100 packets over ~6 s, a file every second, at most 3 files: the run stops itself.
    proc = feed(["-w", template, "-G", "1", "-W", "3", "-v", "-z", str(script)], 100, 0.06)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    status = proc.wait(timeout=20)
    done = log.read_text().splitlines() if log.exists() else []  # as ddump exits
    stderr = proc.stderr.read().decode() if proc.stderr else ""

    assert status == 0, stderr
    files = sorted(tmp_path.glob("t-*.pcap"))
    assert len(files) == 3, stderr
    assert "stopping: -W 3: the last file is done" in stderr
    assert sorted(done) == [str(f) for f in files]  # ddump waited for the last one too
    payloads = [data[16 + 20 :] for f in files for _, data in records(f)]
    assert payloads == [b"live-%d" % i for i in range(len(payloads))]  # in order, none twice
    assert 30 <= len(payloads) < 80  # about three seconds' worth, not the whole six
    for f in files:
        assert assert_readable(f) > 0


def test_a_killed_ddump_leaves_gzip_readable_up_to_the_last_second(tmp_path: Path) -> None:
    out = tmp_path / "k.pcap.gz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", "-w", str(out), "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    sent = 0
    started = time.monotonic()
    for chunk in slow_source(1000, 0.02):
        proc.stdin.write(chunk)
        proc.stdin.flush()
        sent += 1
        if time.monotonic() - started > 3:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdin.close()

    data = out.read_bytes()
    readable = gzip.GzipFile(fileobj=__import__("io").BytesIO(data))
    got = b""
    with contextlib.suppress(EOFError):
        while chunk := readable.read(4096):
            got += chunk
    parser = PcapStreamParser()
    found = parser.feed(got)
    # Packets older than ~1 s before the kill (the last flush) are all there, in order.
    assert len(found) >= sent - 1 - 60, (len(found), sent)
    assert [d[16 + 20 :] for _, d in found] == [b"live-%d" % i for i in range(len(found))]


def test_an_unwritable_directory_is_an_error_naming_the_file_before_capturing(
    tmp_path: Path,
) -> None:
    sources = inputs(tmp_path, packets=10)
    where = tmp_path / "missing" / "x.pcap"

    result = run_ddump(*sources, "-w", str(where), "-C", "1")

    assert result.returncode == 1
    assert f"ddump: cannot write {where}: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def small_disk(size: str) -> Iterator[Path]:
    """A tmpfs of `size`, unmounted afterwards whatever happens."""
    require_root()
    mount_point = Path(tempfile.mkdtemp(prefix="ddump-full-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        os.rmdir(mount_point)


@pytest.mark.parametrize("name", ["full.pcap", "full.pcapng", "full.pcap.gz", "full.pcap.zst"])
def test_a_full_disk_ends_with_an_error_naming_the_file_and_valid_files(
    tmp_path: Path, name: str
) -> None:
    sources = inputs(tmp_path, packets=10000, noise=True)  # ~10 MB; the disk holds 1 MB
    with small_disk("1m") as disk:
        result = run_ddump(*sources, "-w", str(disk / name), "-C", "0.3")
        files = numbered_files(disk, name)
        counts = [assert_readable(f) for f in files]
        kept = [r for f in files for r in records(f)]

    assert result.returncode == 1
    named = re.search(
        rf"cannot write {re.escape(str(disk / name))}\d*: No space left", result.stderr
    )
    assert named, result.stderr
    assert "Traceback" not in result.stderr
    assert all(counts[:-1]) and kept  # the last may hold only its header: still valid
    whole = tmp_path / ("whole" + name[4:])
    assert run_ddump(*sources, "-w", str(whole)).returncode == 0
    assert kept == records(whole)[: len(kept)]


def test_the_status_line_names_the_current_file_and_counts_the_files(tmp_path: Path) -> None:
    import pty

    from tests.fake_worker import Script, fake_workers

    now = time.time_ns() + 3600 * 10**9
    body = pcap_stream([(now + i, sll2_packet(b"tty-%d" % i)) for i in range(3)])
    out = tmp_path / "s.pcap.gz"
    with fake_workers({"/capture": Script(body=[body, 1.5])}) as (w,):
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ddump.cli.main",
                "-w",
                str(out),
                "-C",
                "1",
                w.url("/capture?count=3"),
            ],  # it ends as asked
            stderr=follower,
            stdin=subprocess.DEVNULL,
        )
        os.close(follower)
        proc.wait(timeout=20)
        seen = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 4096):
                seen += chunk
        os.close(leader)

    assert proc.returncode == 0
    assert b"1/1 targets capturing, 3 packets" in seen
    assert f"MB to {out}".encode() in seen  # one file so far: named, not counted
    assert f"3 packets written to {out}".encode() in seen


def test_a_rotated_name_that_is_an_input_file_is_never_written(tmp_path: Path) -> None:
    sources = inputs(tmp_path, packets=1000)
    victim = tmp_path / "in0.pcap1"
    Path(sources[0]).rename(victim)  # an input named as the second file of -w in0.pcap -C
    before = victim.read_bytes()

    result = run_ddump(str(victim), *sources[1:], "-w", str(tmp_path / "in0.pcap"), "-C", "0.05")

    assert result.returncode == 1
    assert f"-w {victim} is the input file" in result.stderr
    assert "the capture stopped" in result.stderr
    assert victim.read_bytes() == before
    assert assert_readable(tmp_path / "in0.pcap") > 0
