"""Rotated output from real workers in namespaces: the files are the plain capture of the run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.netns import parse_seq, udp_traffic
from tests.test_fleet import Cli, Workers, fleet  # noqa: F401  (the fixture)
from tests.test_savefiles import assert_readable, numbered_files, records


def test_files_rotated_by_time_and_by_size_equal_a_plain_capture_of_the_same_run(
    fleet: Workers,  # noqa: F811
    tmp_path: Path,
) -> None:
    h1, h2, _ = fleet.fleet.hosts
    urls = ["--max-delay", "2s", fleet.url(0), fleet.url(1)]
    timed, sized, timed_ng, sized_gz = (tmp_path / d for d in ("t", "s", "tng", "sgz"))
    for directory in (timed, sized, timed_ng, sized_gz):
        directory.mkdir()
    # pcap and pcapng, by time and by size, with and without compression, all at once.
    clis = [
        Cli(urls, tmp_path / "plain.pcap"),
        Cli([*urls, "-G", "2"], timed / "t-%H%M%S.pcap"),
        Cli([*urls, "-C", "0.05"], sized / "s.pcapng.gz"),
        Cli([*urls, "-G", "3"], timed_ng / "t-%H%M%S.pcapng.gz"),
        Cli([*urls, "-C", "0.08"], sized_gz / "s.pcap.gz"),
    ]
    for cli in clis:
        cli.wait_capturing(fleet, 2)

    # Numbered datagrams for about 8 s: 4 time-rotated files, a dozen by size.
    sent = udp_traffic(h1, h2, port=5001, count=1600, rate=200, src_port=4001)
    time.sleep(1.0)
    statuses = [cli.finish(signal.SIGINT) for cli in clis]

    assert statuses == [0] * 5, [cli.stderr for cli in clis]
    assert sent.received == 1600
    plain = clis[0].records()
    assert sorted({parse_seq(d) for _, d in plain}) == list(range(1600))  # out and in: 3200
    assert len(plain) == 3200

    timed_files = sorted(timed.iterdir())
    assert len(timed_files) >= 4
    assert [r for f in timed_files for r in records(f)] == plain

    sized_files = numbered_files(sized, "s.pcapng.gz")
    assert len(sized_files) >= 8
    epbs = [r for f in sized_files for r in records(f)]
    assert [(ts, data) for _, ts, data in epbs] == [(ts, rec[16:]) for ts, rec in plain]

    timed_ng_files = sorted(timed_ng.iterdir())
    assert len(timed_ng_files) >= 3
    epbs = [r for f in timed_ng_files for r in records(f)]
    assert [(ts, data) for _, ts, data in epbs] == [(ts, rec[16:]) for ts, rec in plain]

    sized_gz_files = numbered_files(sized_gz, "s.pcap.gz")
    assert len(sized_gz_files) >= 5
    assert [r for f in sized_gz_files for r in records(f)] == plain

    for f in timed_files + sized_files + timed_ng_files + sized_gz_files:
        assert assert_readable(f) > 0
    assert f"files, the last {sized / sized_files[-1].name}" in clis[2].stderr
