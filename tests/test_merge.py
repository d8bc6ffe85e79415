"""The merge engine: order, completeness, bounded waiting, late records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ddump.merge import FOREVER, Merger
from ddump.pcap import Record

MS = 1_000_000


def rec(ts: int, tag: str = "") -> Record:
    return (ts, f"{ts}:{tag}".encode())


def test_release_interleaves_streams_in_timestamp_order() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.push(a, [rec(1), rec(4), rec(6)])
    merger.push(b, [rec(2), rec(3), rec(7)])

    assert [ts for ts, _ in merger.release(5)] == [1, 2, 3, 4]
    assert [ts for ts, _ in merger.drain()] == [6, 7]


def test_ties_keep_target_order() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.push(b, [rec(5, "b")])
    merger.push(a, [rec(5, "a")])

    assert [data for _, data in merger.drain()] == [b"5:a", b"5:b"]


def test_nothing_is_released_while_a_stream_is_still_connecting() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.start_stream(a)
    merger.push(a, [rec(1)])

    assert merger.watermark(10**18, max_delay_ns=0) == -1
    merger.start_stream(b)
    assert merger.watermark(10**18, max_delay_ns=0) == 10**18


def test_busy_streams_release_what_is_older_than_the_slowest_newest_record() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.start_stream(a)
    merger.start_stream(b)
    now = 1_000 * MS
    merger.push(a, [rec(now - 3 * MS), rec(now - 1 * MS)])
    merger.push(b, [rec(now - 2 * MS)])

    mark = merger.watermark(now, max_delay_ns=250 * MS)

    assert mark == now - 2 * MS - 1  # b may still send more at now - 2 ms
    assert [ts for ts, _ in merger.release(mark)] == [now - 3 * MS]


def test_idle_target_does_not_stall_output() -> None:
    merger = Merger()
    busy, merger_idle = merger.add_stream("busy"), merger.add_stream("idle")
    merger.start_stream(busy)
    merger.start_stream(merger_idle)
    start = 1_000 * MS
    merger.push(busy, [rec(start + 10 * MS)])

    before = merger.release(merger.watermark(start + 200 * MS, max_delay_ns=250 * MS))
    after = merger.release(merger.watermark(start + 261 * MS, max_delay_ns=250 * MS))

    assert before == []
    assert [ts for ts, _ in after] == [start + 10 * MS]
    assert merger.streams[merger_idle].pushed == 0


def test_clock_offset_moves_an_idle_streams_mark() -> None:
    merger = Merger()
    ahead = merger.add_stream("ahead")
    merger.start_stream(ahead, clock_offset_ns=5 * MS)

    assert merger.watermark(100 * MS, max_delay_ns=10 * MS) == 95 * MS


def test_a_delayed_stream_holds_the_others_back_for_its_delay_too() -> None:
    merger = Merger()
    busy, batch = merger.add_stream("busy"), merger.add_stream("batch", delay_ns=1000 * MS)
    merger.start_stream(busy)
    merger.start_stream(batch)
    start = 10_000 * MS
    merger.push(busy, [rec(start)])

    assert merger.watermark(start + 1200 * MS, max_delay_ns=250 * MS) == start - 50 * MS
    assert merger.watermark(start + 1300 * MS, max_delay_ns=250 * MS) == start + 50 * MS
    # Its own records still move its mark at once, like any stream's.
    merger.push(batch, [rec(start + 5 * MS)])
    assert merger.watermark(start, max_delay_ns=250 * MS) == start - 1


def test_ended_stream_no_longer_holds_output() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.push(a, [rec(50)])
    merger.end_stream(b)
    merger.end_stream(a)

    assert merger.watermark(0, max_delay_ns=0) == FOREVER
    assert [ts for ts, _ in merger.release(FOREVER)] == [50]


def test_untimed_streams_merge_by_timestamps_alone() -> None:
    merger = Merger()
    a, b = merger.add_stream("a.pcap", timed=False), merger.add_stream("b.pcap", timed=False)
    merger.push(a, [rec(10), rec(30)])

    assert merger.watermark(10**18, max_delay_ns=0) < 0
    merger.push(b, [rec(20)])
    assert [ts for ts, _ in merger.release(merger.watermark(10**18, max_delay_ns=0))] == [10]
    merger.end_stream(b)
    assert [ts for ts, _ in merger.release(merger.watermark(10**18, max_delay_ns=0))] == [20]


def test_ties_stay_in_stream_order_when_a_stream_sends_its_newest_time_again() -> None:
    merger = Merger()
    a, b = merger.add_stream("a", timed=False), merger.add_stream("b", timed=False)
    merger.push(a, [(5, b"a0")])
    merger.push(b, [(5, b"b0"), (6, b"b1")])
    out = merger.release(merger.watermark(0, max_delay_ns=0))
    merger.push(a, [(5, b"a1")])  # a's newest time again: it must come before b's
    out += merger.release(merger.watermark(0, max_delay_ns=0))
    merger.end_stream(a)
    merger.end_stream(b)
    out += merger.drain()
    assert [data for _, data in out] == [b"a0", b"a1", b"b0", b"b1"]
    assert merger.streams[a].late == 0


def test_late_record_is_returned_for_immediate_write_and_counted() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.push(a, [rec(10), rec(20)])
    assert [ts for ts, _ in merger.release(20)] == [10, 20]

    late = merger.push(b, [rec(15), rec(25)])

    assert [ts for ts, _ in late] == [15]
    assert merger.streams[b].late == 1
    assert [ts for ts, _ in merger.drain()] == [25]


def test_out_of_order_batches_within_a_stream_are_sorted() -> None:
    merger = Merger()
    a = merger.add_stream("a")
    merger.push(a, [rec(5), rec(3)])
    merger.push(a, [rec(4), rec(9)])

    assert [ts for ts, _ in merger.drain()] == [3, 4, 5, 9]


batches = st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(0, 1000), max_size=20)), max_size=30
)


@given(batches=batches, marks=st.lists(st.integers(0, 1000), max_size=30))
def test_merged_output_loses_nothing_and_only_late_records_go_backwards(
    batches: list[tuple[int, list[int]]], marks: list[int]
) -> None:
    merger = Merger()
    for name in "abcd":
        merger.add_stream(name)
    written: list[tuple[Record, bool]] = []
    sent: list[Record] = []
    for i, (stream, stamps) in enumerate(batches):
        records = [rec(ts, f"{stream}.{i}.{j}") for j, ts in enumerate(stamps)]
        sent.extend(records)
        written.extend((r, True) for r in merger.push(stream, records))
        if i < len(marks):
            written.extend((r, False) for r in merger.release(marks[i]))
    written.extend((r, False) for r in merger.drain())

    assert sorted(r for r, _ in written) == sorted(sent)
    in_place = [r[0] for r, late in written if not late]
    assert in_place == sorted(in_place)
    assert sum(s.late for s in merger.streams) == sum(1 for _, late in written if late)
    assert merger.buffered == 0


def test_oldest_mark_is_where_the_oldest_records_end() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.push(a, [rec(30), rec(10)])
    merger.push(b, [rec(20), rec(40)])
    assert [merger.oldest_mark(n) for n in (1, 2, 3, 4)] == [10, 20, 30, 40]
    assert [ts for ts, _ in merger.release(merger.oldest_mark(3))] == [10, 20, 30]
    assert merger.buffered == 1


def walked_watermark(
    merger: Merger, now_ns: int, max_delay_ns: int, backlogged: frozenset[int] = frozenset()
) -> int:
    """The watermark by its definition: every stream's mark, walked (what _Marks must equal).
    A stream with bytes unread (`backlogged`) has no idle term."""
    if any(s.live and not s.started for s in merger.streams):
        return -1
    untimed = [s.newest_ns - 1 for s in merger.streams if s.live and not s.timed]
    timed = [
        s.newest_ns - 1
        if index in backlogged
        else max(s.newest_ns - 1, now_ns - max_delay_ns - s.delay_ns + s.clock_offset_ns)
        for index, s in enumerate(merger.streams)
        if s.live and s.timed
    ]
    return min([FOREVER, *untimed, *timed])


steps = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 7), st.integers(0, 3000)),
        st.tuples(st.just("start"), st.integers(0, 7), st.integers(-500, 500)),
        st.tuples(st.just("end"), st.integers(0, 7), st.just(0)),
        st.tuples(st.just("tick"), st.integers(0, 800), st.integers(0, 400)),
        st.tuples(st.just("backlog"), st.integers(0, 7), st.just(0)),
    ),
    max_size=80,
)


@given(
    kinds=st.lists(
        st.tuples(st.booleans(), st.sampled_from([0, 0, 50, 700])), min_size=1, max_size=8
    ),
    steps=steps,
)
def test_watermark_is_the_least_mark_of_the_live_streams_without_walking_them(
    kinds: list[tuple[bool, int]], steps: list[tuple[str, int, int]]
) -> None:
    backlog: set[int] = set()  # streams with bytes unread: toggled by "backlog"
    merger = Merger(unread=lambda: backlog)
    for index, (timed, delay) in enumerate(kinds):
        merger.add_stream(str(index), timed=timed, delay_ns=delay if timed else 0)
        merger.start_stream(index)
    now, max_delay = 1000, 250
    for action, which, value in steps:
        stream = which % len(kinds)
        if action == "push":
            merger.push(stream, [rec(value), rec(value + 3)])
        elif action == "start":
            merger.start_stream(stream, value)
        elif action == "end":
            merger.end_stream(stream)
        elif action == "backlog":
            backlog.symmetric_difference_update({stream})
        else:  # time goes on; now and then the allowed delay changes
            now += which
            if value > 300:
                max_delay = (value - 300) * 10
        assert merger.watermark(now, max_delay) == walked_watermark(
            merger, now, max_delay, frozenset(backlog)
        )


def test_watermark_bookkeeping_stays_bounded_by_the_streams_however_long_it_runs() -> None:
    merger = Merger()
    streams = [merger.add_stream(str(i)) for i in range(64)]
    for stream in streams:
        merger.start_stream(stream)
    merger.start_stream(streams[0], -3600 * 1000 * MS)  # a clock an hour behind: holds the mark
    for tick in range(1, 20_000):
        merger.push(streams[tick % 64], [rec(tick * MS)])
        assert merger.watermark(tick * MS, 250 * MS) == walked_watermark(
            merger, tick * MS, 250 * MS
        )
    marks = merger._marks
    heaps = (marks._by_newest, marks._by_crossing, marks._by_offset, marks._crossed_by_newest)
    assert sum(map(len, heaps)) <= 8 * 64 + 64


def test_wait_ns_is_when_the_clock_alone_lets_the_oldest_held_record_out() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.start_stream(a)
    merger.start_stream(b, clock_offset_ns=-5 * MS)  # b's clock runs 5 ms behind ours
    now, delay = 1_000 * MS, 250 * MS
    merger.push(a, [rec(now - 100 * MS)])
    # b is idle: its mark is now - delay + offset, so the record waits 155 ms more.
    wait = merger.wait_ns(now, delay)

    assert wait == 155 * MS
    assert merger.release(merger.watermark(now + wait - 1, delay)) == []
    assert [ts for ts, _ in merger.release(merger.watermark(now + wait, delay))] == [now - 100 * MS]
    assert merger.wait_ns(now + wait, delay) is None  # nothing held back


def test_wait_ns_is_none_while_the_clock_alone_cannot_release() -> None:
    merger = Merger()
    a, b = merger.add_stream("a"), merger.add_stream("f", timed=False)  # f: a file or a pipe
    merger.start_stream(a)
    merger.push(a, [rec(10 * MS)])
    merger.push(b, [rec(5 * MS)])

    assert merger.wait_ns(10**18, 0) is None  # f must send a later record first
    c = merger.add_stream("c")  # not started: nothing goes out meanwhile
    assert merger.wait_ns(10**18, 0) is None
    merger.start_stream(c)
    assert merger.wait_ns(10**18, 0) is None  # still f's to settle


def test_wait_ns_for_a_busy_streams_own_newest_record_is_its_idle_term() -> None:
    # One stream: its newest record is held (more may come at that timestamp) until a later
    # one comes or its idle term passes it, max delay later; not in a nanosecond.
    merger = Merger()
    a = merger.add_stream("a")
    merger.start_stream(a, clock_offset_ns=2 * MS)
    now, delay = 1_000 * MS, 250 * MS
    merger.push(a, [rec(now - 10 * MS), rec(now - 1 * MS)])
    assert [ts for ts, _ in merger.release(merger.watermark(now, delay))] == [now - 10 * MS]

    wait = merger.wait_ns(now, delay)

    assert wait == 249 * MS - 2 * MS  # its mark is T + offset: T must reach now - 3 ms
    assert merger.release(merger.watermark(now + wait - 1, delay)) == []
    assert [ts for ts, _ in merger.release(merger.watermark(now + wait, delay))] == [now - MS]


def started_pair(merger: Merger, a_at: int, b_at: int) -> tuple[int, int]:
    """Streams a and b, started, each with one record (b's pushed first)."""
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.start_stream(a)
    merger.start_stream(b)
    merger.push(b, [rec(b_at)])
    merger.push(a, [rec(a_at)])
    return a, b


def quiet_b_unread_behind_a(unread: set[int]) -> tuple[Merger, int, int, int, int]:
    """Streams a and b started; b sent a record 500 ms ago and has more unread (`unread`
    says which streams have bytes unread), a one 300 ms ago. (merger, a, b, now, max delay)."""
    merger = Merger(unread=lambda: unread)
    now, delay = 1_000 * MS, 50 * MS
    a, b = started_pair(merger, now - 300 * MS, now - 500 * MS)
    return merger, a, b, now, delay


def asking(answer: list[int], asked: list[int]) -> Merger:
    """A merger whose question for bytes unread answers `answer`, noting each time in `asked`."""

    def unread() -> list[int]:
        asked.append(1)
        return answer

    return Merger(unread=unread)


def test_a_quiet_stream_with_bytes_unread_holds_the_others_until_they_are_read() -> None:
    # A CLI short of CPU: b's records wait in its socket, older than now - max delay. Its idle
    # term would let a's records out first, and then every one of b's would be late.
    unread = {1}
    merger, _, b, now, delay = quiet_b_unread_behind_a(unread)

    mark = merger.watermark(now, delay)
    assert [ts for ts, _ in merger.release(mark)] == []
    assert merger.wait_ns(now, delay, mark) is None  # not the clock's to settle: b's read is
    assert merger.wait_ns(now, delay) is None
    merger.push(b, [rec(now - 400 * MS)])  # what was waiting in b's socket
    unread.clear()
    assert [ts for ts, _ in merger.release(merger.watermark(now, delay))] == [
        now - 500 * MS,
        now - 400 * MS,
        now - 300 * MS,
    ]
    assert sum(s.late for s in merger.streams) == 0


def test_streams_that_all_sent_lately_are_not_asked_for_bytes_unread() -> None:
    # 1,024 targets at 10 packets/s: each sent within --max-delay, so each one's mark is its
    # newest record already, and bytes unread cannot lower it: no probe per release.
    asked: list[int] = []
    merger = asking([0, 1], asked)
    now, delay = 1_000 * MS, 250 * MS
    started_pair(merger, now - 100 * MS, now - 50 * MS)
    assert merger.watermark(now, delay) == now - 100 * MS - 1
    assert asked == []
    assert merger.watermark(now + 200 * MS, delay) == now - 100 * MS - 1  # a crossed: asked
    assert asked == [1]


def test_a_busy_stream_alone_is_not_asked_for_bytes_unread() -> None:
    asked: list[int] = []
    merger = asking([0], asked)
    a = merger.add_stream("a")
    merger.start_stream(a)
    merger.push(a, [rec(990 * MS)])
    assert merger.watermark(1_000 * MS, 50 * MS) == 990 * MS - 1
    assert asked == []  # one capture's reads cost no question


def test_an_ended_streams_held_records_wait_for_the_unread_bytes_of_the_one_left() -> None:
    # a ends (its count reached) with a record still held; b, the only live stream left, has
    # older records unread: a's record must wait for them, or they would all be late.
    unread = {1}
    merger, a, b, now, delay = quiet_b_unread_behind_a(unread)
    assert merger.release(merger.watermark(now, delay)) == []
    merger.end_stream(a)
    assert merger.release(merger.watermark(now, delay)) == []
    assert merger.push(b, [rec(now - 400 * MS)]) == []  # not late
    unread.clear()
    released = merger.release(merger.watermark(now, delay))
    assert [ts for ts, _ in released] == [now - 500 * MS, now - 400 * MS, now - 300 * MS]


def test_bytes_unread_do_not_hold_an_ended_stream_or_lift_a_mark() -> None:
    unread = {0, 1}
    merger = Merger(unread=lambda: unread)
    a, b = merger.add_stream("a"), merger.add_stream("b")
    merger.start_stream(a)
    merger.start_stream(b)
    now, delay = 1_000 * MS, 50 * MS
    merger.push(a, [rec(now - 10 * MS)])  # busy: its mark is its newest record anyway
    merger.push(b, [rec(now - 500 * MS)])
    assert merger.watermark(now, delay) == now - 500 * MS - 1
    merger.end_stream(b)
    assert merger.watermark(now, delay) == now - 10 * MS - 1


@given(
    st.lists(
        st.tuples(
            st.integers(-50, 50),  # clock offset, ms
            st.booleans(),  # a batch stream (delay 20 ms)
            st.lists(st.integers(0, 400), max_size=4),  # record times, ms
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 600),
)
def test_wait_ns_never_sleeps_past_a_release(
    streams: list[tuple[int, bool, list[int]]], now_ms: int
) -> None:
    # Waking at now + wait_ns, and again at each new wait, releases the oldest held record no
    # later than the first moment the watermark lets it out.
    merger = Merger()
    for index, (offset, batch, times) in enumerate(streams):
        merger.add_stream(str(index), delay_ns=20 * MS if batch else 0)
        merger.start_stream(index, clock_offset_ns=offset * MS)
        merger.push(index, sorted(rec(t * MS) for t in times))
    delay, now = 100 * MS, now_ms * MS
    merger.release(merger.watermark(now, delay))
    while (wait := merger.wait_ns(now, delay)) is not None:
        oldest = merger.oldest_mark(1)
        assert wait == 0 or merger.watermark(now + wait - 1, delay) < oldest
        now += wait
        merger.release(merger.watermark(now, delay))
