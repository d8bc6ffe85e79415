"""When a worker's capture ended as asked, and when to retry one that did not (pure code)."""

from __future__ import annotations

import io

from ddump.cli.ends import AskedEnd, asked_end, retry_delay
from ddump.cli.report import Gap, Reporter, TargetCounts

S = 10**9


def test_the_url_says_what_end_was_asked_for() -> None:
    assert asked_end("http://h:8475/capture?filter=udp&count=5") == AskedEnd(5, None)
    assert asked_end("http://h/capture?duration=1.5") == AskedEnd(None, 1_500_000_000)
    assert asked_end("http://h/capture?count=2&count=7&duration=0.25") == AskedEnd(7, S // 4)
    assert asked_end("http://h/capture?filter=udp") == AskedEnd()
    assert asked_end("http://h/capture?count=x&duration=-1") == AskedEnd()


def test_only_the_asked_count_or_duration_is_a_normal_end() -> None:
    assert AskedEnd(count=5).reached(5, 0)
    assert not AskedEnd(count=5).reached(4, 10 * S)
    assert AskedEnd(duration_ns=10 * S).reached(0, 10 * S)
    assert AskedEnd(duration_ns=10 * S).reached(0, 9_600_000_000)  # the answer came late
    assert not AskedEnd(duration_ns=10 * S).reached(0, 9 * S)
    assert not AskedEnd(duration_ns=S // 10).reached(0, S // 50)
    assert not AskedEnd().reached(1_000_000, 3600 * S)  # nothing asked: any end is a loss


def test_a_target_healthy_moments_ago_is_retried_soon_then_with_backoff() -> None:
    delays: list[float] = []
    delay = None
    for since, just_lost in [(0.0, True), (0.3, False), (5.0, False), (16.0, False)] + [
        (20.0, False)
    ] * 6:
        delay = retry_delay(delay, since, just_lost)
        delays.append(delay)
    assert delays == [0.25, 0.5, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_target_that_never_captured_backs_off_from_one_second() -> None:
    assert retry_delay(None, None, False) == 1.0
    assert retry_delay(1.0, None, False) == 2.0
    assert retry_delay(16.0, None, False) == 30.0


def test_the_summary_gives_each_gap_its_times_and_says_the_capture_is_partial() -> None:
    out = io.StringIO()
    reporter = Reporter(out, quiet=False, verbose=False)
    start = 1_800_000_000 * S
    web = TargetCounts("web-1", state="stopped", packets=10, bytes=1000)
    web.gaps += [
        Gap(start, start + 2_519_000_000, "connection stalled"),
        Gap(start + 5 * S, None, "x"),
    ]
    db = TargetCounts("db-1", state="stopped", packets=3, bytes=300)
    reporter.summary([web, db], 13, 0, ended_ns=start + 7 * S)
    text = out.getvalue()
    assert "(2.519 s): connection stalled" in text
    assert "to the end (2.000 s): x" in text
    assert "the capture is partial: 2 gaps, 4.5 s not captured in all (web-1)" in text
    assert "db-1   3 packets, 300 bytes  [stopped]" in text


def test_event_lines_carry_the_time_of_day_while_a_capture_runs() -> None:
    out = io.StringIO()
    reporter = Reporter(out, quiet=False, verbose=False)
    reporter.info("before")
    reporter.timestamps = True
    reporter.warn("during")
    before, during = out.getvalue().splitlines()
    assert before == "ddump: before"
    assert during.startswith("ddump: ") and during.endswith(" warning: during")
    assert during[7:19].count(":") == 2 and during[15] == "."
