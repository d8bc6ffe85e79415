"""The worker's pure parts: BPF composition, query checks, tcpdump's words, --listen."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddump.errors import UsageError
from ddump.worker.capture import pipe_size_for
from ddump.worker.filter import (
    MAX_FILTER_LEN,
    FilterError,
    check_filter,
    compose_filter,
    self_exclusion,
    tcpdump_argv,
)
from ddump.worker.listen import TcpListen, UnixListen, parse_listen
from ddump.worker.main import build_parser
from ddump.worker.params import CaptureParams, parse_query
from ddump.worker.tcpdump import (
    RecordCounter,
    TcpdumpStats,
    classify_start_failure,
    error_lines,
    parse_stats,
    stats_counts,
)

SELF = "tcp port 8475"


def query(**values: str) -> CaptureParams:
    return parse_query({name: [value.encode()] for name, value in values.items()})


# ---- composition: the exclusions always hold ----


def test_user_filter_is_anded_inside_its_own_parentheses() -> None:
    assert compose_filter("tcp or udp", [SELF]) == "not (tcp port 8475) and (tcp or udp)"


def test_every_exclusion_is_negated_in_parentheses() -> None:
    composed = compose_filter("icmp", [SELF, "tcp port 443 or udp port 53"])
    assert composed == "not (tcp port 8475) and not (tcp port 443 or udp port 53) and (icmp)"


def test_no_user_filter_leaves_only_the_exclusions() -> None:
    assert compose_filter(None, [SELF]) == "not (tcp port 8475)"
    assert compose_filter(None, []) == ""


@pytest.mark.parametrize(
    "attempt",
    [
        "tcp) or (tcp port 8475",
        ") or (",
        "udp or tcp)",
        "((tcp)",
        "(",
        "tcp port 8475) or (1 = 1",
    ],
)
def test_a_filter_that_could_close_the_parentheses_is_refused(attempt: str) -> None:
    with pytest.raises(FilterError, match="unbalanced parentheses"):
        check_filter(attempt)
    with pytest.raises(FilterError):
        compose_filter(attempt, [SELF])


@given(st.text(alphabet="()a ", max_size=40))
def test_an_accepted_filter_stays_inside_its_parentheses(text: str) -> None:
    try:
        checked = check_filter(text)
    except FilterError:
        return
    composed = compose_filter(checked, [SELF])
    if checked is None:
        return
    # The user's part opens right after our `and (` and closes only at the very end.
    start = composed.index(" and (") + len(" and (")
    depth = 1
    for position, char in enumerate(composed[start:], start=start):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            assert position == len(composed) - 1
    assert depth == 0


def test_filters_full_of_parentheses_and_or_are_accepted_when_balanced() -> None:
    text = "tcp or (udp) or ((tcp port 8475)) or (icmp and (not arp))"
    assert check_filter(text) == text


def test_empty_or_blank_filter_means_none() -> None:
    assert check_filter("") is None
    assert check_filter("  \t\n") is None


def test_filter_with_nul_is_refused() -> None:
    with pytest.raises(FilterError, match="NUL"):
        check_filter("tcp\x00 or udp")


def test_filter_longer_than_the_cap_is_refused() -> None:
    check_filter("a" * MAX_FILTER_LEN)
    with pytest.raises(FilterError, match="limit"):
        check_filter("a" * (MAX_FILTER_LEN + 1))


# ---- self-exclusion ----


def test_unbound_worker_excludes_its_port_on_every_address() -> None:
    assert self_exclusion(8475) == "tcp port 8475"
    assert self_exclusion(8475, ["0.0.0.0", "::"]) == "tcp port 8475"


def test_bound_worker_excludes_its_port_only_on_its_address() -> None:
    assert self_exclusion(8475, ["198.18.0.1"]) == "host 198.18.0.1 and tcp port 8475"
    assert (
        self_exclusion(9000, ["127.0.0.1", "::1"])
        == "(host 127.0.0.1 or host ::1) and tcp port 9000"
    )


def test_ipv6_scope_is_dropped_and_names_fall_back_to_the_port() -> None:
    assert self_exclusion(1, ["fe80::1%eth0"]) == "host fe80::1 and tcp port 1"
    assert self_exclusion(1, ["localhost"]) == "tcp port 1"


# ---- tcpdump argv ----


def test_argv_is_fixed_options_then_filter_after_double_dash() -> None:
    assert tcpdump_argv("/usr/bin/tcpdump", "not (tcp port 8475)") == [
        "/usr/bin/tcpdump",
        "-i",
        "any",
        "-U",
        "-w",
        "-",
        "--time-stamp-precision=nano",
        "--immediate-mode",
        "-s",
        "262000",
        "--",
        "not (tcp port 8475)",
    ]


def test_a_batch_capture_runs_tcpdump_without_immediate_mode() -> None:
    immediate = tcpdump_argv("tcpdump", "udp")
    batch = tcpdump_argv("tcpdump", "udp", batch=True)
    assert "--immediate-mode" in immediate
    assert batch == [arg for arg in immediate if arg != "--immediate-mode"]


def test_argv_carries_buffer_snaplen_and_count() -> None:
    argv = tcpdump_argv("tcpdump", "udp", snaplen=96, count=10, buffer_kib=4096)
    assert argv[-8:] == ["-B", "4096", "-s", "96", "-c", "10", "--", "udp"]


def test_argv_without_filter_ends_with_double_dash() -> None:
    assert tcpdump_argv("tcpdump", "")[-1] == "--"


# ---- query parameters ----


def test_query_accepts_every_documented_parameter() -> None:
    params = query(filter=" udp ", snaplen="96", count="3", duration="1.5", batch="1")
    assert params == CaptureParams(
        filter="udp", snaplen=96, count=3, duration_ns=1_500_000_000, batch=True
    )


@pytest.mark.parametrize(
    ("text", "batch"), [("0", False), ("1", True), ("true", True), (" FALSE ", False)]
)
def test_batch_is_a_flag(text: str, batch: bool) -> None:
    assert query(batch=text).batch is batch
    assert query().batch is False


@pytest.mark.parametrize("text", ["", "2", "yes", "on"])
def test_batch_other_than_0_or_1_is_refused(text: str) -> None:
    with pytest.raises(FilterError, match="batch must be 0 or 1"):
        query(batch=text)


def test_unknown_parameter_is_refused_with_the_accepted_list() -> None:
    with pytest.raises(FilterError) as caught:
        query(interface="eth0")
    message = str(caught.value)
    assert "'interface'" in message
    for name in ("filter", "snaplen", "count", "duration", "batch"):
        assert name in message
    assert "any" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("snaplen", "0"),
        ("snaplen", "262145"),
        ("snaplen", "-1"),
        ("snaplen", "x"),
        ("count", "0"),
        ("count", "1.5"),
        ("count", "99999999999"),
        ("duration", "0"),
        ("duration", "-2"),
        ("duration", "nan"),
        ("duration", "inf"),
        ("duration", "1e999999999"),
        ("duration", "soon"),
    ],
)
def test_out_of_range_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(FilterError, match=name):
        query(**{name: value})


def test_duration_is_exact_integer_nanoseconds() -> None:
    assert query(duration="0.000000001").duration_ns == 1
    assert query(duration="10").duration_ns == 10 * 10**9


def test_a_parameter_given_twice_is_refused() -> None:
    with pytest.raises(FilterError, match="given 2 times"):
        parse_query({"count": [b"1", b"2"]})


def test_a_parameter_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(FilterError, match="UTF-8"):
        parse_query({"filter": [b"\xff"]})


# ---- what tcpdump says ----

STDERR_END = """tcpdump: data link type LINUX_SLL2
tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2), snapshot length 262144 bytes
12 packets captured
1 packet received by filter
3 packets dropped by kernel
"""


def test_exit_statistics_are_parsed_singular_or_plural() -> None:
    assert parse_stats(STDERR_END) == TcpdumpStats(captured=12, received=1, dropped_by_kernel=3)


def test_statistics_on_request_are_one_line_and_the_latest_counts_win() -> None:
    stderr = (
        "tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2)\n"
        "tcpdump: 5 packets captured, 9 packets received by filter, 0 packets dropped by kernel\n"
        "tcpdump: 8 packets captured, 20 packets received by filter, 4 packets dropped by kernel\n"
    )
    assert parse_stats(stderr) == TcpdumpStats(captured=8, received=20, dropped_by_kernel=4)
    assert parse_stats(stderr + "9 packets captured\n") == TcpdumpStats(9, 20, 4)
    assert stats_counts("tcpdump: 5 packets captured, and then some") == {}
    # tcpdump prefixes its name as it was called.
    assert stats_counts("tcpdump-4.99: 1 packet captured, 2 packets received by filter") == {
        "captured": 1,
        "received by filter": 2,
    }
    assert error_lines(stderr + "tcpdump: pcap_loop: The interface disappeared\n") == (
        "pcap_loop: The interface disappeared"
    )


def test_no_statistics_when_tcpdump_was_killed() -> None:
    assert parse_stats("tcpdump: listening on any\n") == TcpdumpStats()


def test_filter_syntax_error_is_a_400_with_tcpdumps_words() -> None:
    failure = classify_start_failure(
        "tcpdump: data link type LINUX_SLL2\n"
        "tcpdump: can't parse filter expression: syntax error\n",
        1,
    )
    assert failure.status == 400
    assert "can't parse filter expression: syntax error" in failure.message
    assert "data link type" not in failure.message


def test_missing_capability_is_a_503_naming_the_fix() -> None:
    failure = classify_start_failure(
        "tcpdump: any: You don't have permission to perform this capture on that device\n"
        "(socket: Operation not permitted)\n",
        1,
    )
    assert failure.status == 503
    assert "CAP_NET_RAW" in failure.message
    assert "AmbientCapabilities" in failure.message
    assert "setcap" in failure.message


def test_silent_exit_still_explains_itself() -> None:
    assert "status 1" in classify_start_failure("", 1).message


def _pcap(caplens: list[int], big_endian: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    out = struct.pack(order + "IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 276)
    for caplen in caplens:
        out += struct.pack(order + "IIII", 1, 2, caplen, caplen) + b"x" * caplen
    return out


@given(
    st.lists(st.integers(0, 300), max_size=12),
    st.lists(st.integers(0, 50), max_size=60),
    st.booleans(),
)
def test_records_are_counted_however_the_stream_is_split(
    caplens: list[int], cuts: list[int], big: bool
) -> None:
    data = _pcap([0, 7, 300, 16, 1, *caplens], big_endian=big)
    counter = RecordCounter()
    position = 0
    for cut in cuts:
        counter.feed(data[position : position + cut])
        position += cut
    counter.feed(data[position:])
    assert (counter.records, counter.bytes) == (5 + len(caplens), len(data))


def _timed_pcap(stamps_ns: list[int], nano: bool = True, big_endian: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, 276)
    for index, ts in enumerate(stamps_ns):
        frac = ts % 10**9 if nano else ts % 10**9 // 1000
        body = bytes([index]) * (index % 7 + 1)
        out += struct.pack(order + "IIII", ts // 10**9, frac, len(body), len(body)) + body
    return out


@given(
    st.lists(st.integers(0, 40), max_size=30),
    st.integers(0, 12),
    st.booleans(),
    st.booleans(),
)
def test_a_cutoff_ends_the_stream_before_the_first_later_record(
    cuts: list[int], cutoff_after: int, nano: bool, big: bool
) -> None:
    stamps = [10**9 * second + 500_000 for second in range(1, 11)]
    data = _timed_pcap(stamps, nano=nano, big_endian=big)
    starts = [len(_timed_pcap(stamps[:index], nano=nano)) for index in range(len(stamps))]
    counter = RecordCounter()
    passed = b""
    position = 0
    begun = len(stamps)  # records begun before the cutoff was set
    for cut in [*cuts, len(data)]:
        if counter.cutoff_ns is None and position >= 24:  # set once the stream runs
            counter.cutoff_ns = 10**9 * cutoff_after + 700_000  # after second `cutoff_after`
            begun = sum(start < position for start in starts)
        passed += counter.feed(data[position : position + cut])
        position += cut
        if counter.cut:
            break
    # What is passed on is whole records: every one up to the cutoff, and one already begun
    # when the cutoff came (it cannot be cut any more), nothing else.
    kept_records = min(len(stamps), max(cutoff_after, begun))
    assert counter.records == kept_records
    assert passed == _timed_pcap(stamps[:kept_records], nano=nano, big_endian=big)


def test_a_cutoff_keeps_records_up_to_it_and_cuts_the_rest_in_one_chunk() -> None:
    stamps = [10**9 * second for second in range(1, 6)]
    data = _timed_pcap(stamps)
    counter = RecordCounter()
    assert counter.feed(data[:24]) == data[:24]
    counter.cutoff_ns = 3 * 10**9  # records at 1, 2 and 3 s stay; 4 and 5 s go
    assert data[:24] + counter.feed(data[24:]) == _timed_pcap(stamps[:3])
    assert counter.records == 3 and counter.cut
    assert counter.feed(b"more") == b""


def test_pipe_size_stays_within_the_users_pipe_quota() -> None:
    assert pipe_size_for(16, quota_pages=16384) == 1024 * 1024
    assert pipe_size_for(64, quota_pages=16384) == 512 * 1024
    assert pipe_size_for(256, quota_pages=16384) == 128 * 1024
    assert pipe_size_for(100_000, quota_pages=16384) == 64 * 1024  # the kernel's default
    assert pipe_size_for(100_000, quota_pages=0) == 1024 * 1024  # no quota


# ---- --listen ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8475", TcpListen(None, 8475)),
        ("8475", TcpListen(None, 8475)),
        ("127.0.0.1:9000", TcpListen("127.0.0.1", 9000)),
        ("[::1]:8475", TcpListen("::1", 8475)),
        ("[::]:0", TcpListen("::", 0)),
        ("localhost:1", TcpListen("localhost", 1)),
        ("unix:/run/ddump.sock", UnixListen("/run/ddump.sock")),
    ],
)
def test_listen_addresses(text: str, expected: TcpListen | UnixListen) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["::1:8475", "host", "[::1]", ":99999", ":x", "unix:", "[::1]x"])
def test_bad_listen_addresses_say_what_to_write(text: str) -> None:
    with pytest.raises(UsageError, match="--listen"):
        parse_listen(text)


def test_single_dash_listen_is_accepted() -> None:
    assert build_parser().parse_args(["-listen", ":1234"]).listen == ":1234"
    assert build_parser().parse_args(["--listen=unix:/x"]).listen == "unix:/x"


def test_help_documents_the_socket_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--socket-mode" in out
    assert "0660" in out
    assert "-listen" in out


def test_the_filter_limit_counts_bytes_since_an_argument_is_bytes() -> None:
    # 45,000 euro signs are 135,000 bytes: over the kernel's 128 KiB for one argument.
    with pytest.raises(FilterError, match="135000 bytes long"):
        check_filter("\u20ac" * 45000)
