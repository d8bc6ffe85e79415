"""Target URLs: the grammar of the Go ddump, its defaults, and passwords that never show."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ddump.errors import UsageError
from ddump.targets import (
    DEFAULT_PATH,
    DEFAULT_PORT,
    Target,
    parse_target,
    redact,
    unique_names,
)


def target(name: str, filter_: str | None = None) -> Target:
    return Target(name=name, url=f"http://{name}:8475/capture", filter=filter_)


def test_defaults_are_port_8475_and_path_capture_for_both_schemes() -> None:
    assert (DEFAULT_PORT, DEFAULT_PATH) == (8475, "/capture")
    assert parse_target("http://web-1").url == "http://web-1:8475/capture"
    assert parse_target("https://web-1").url == "https://web-1:8475/capture"


@pytest.mark.parametrize(
    ("text", "url", "name", "filter_"),
    [
        ("http://web-1", "http://web-1:8475/capture", "web-1:8475", None),
        ("http://web-1:9000/", "http://web-1:9000/capture", "web-1:9000", None),
        ("HTTPS://Web-1", "https://Web-1:8475/capture", "Web-1:8475", None),
        ("  http://web-1  ", "http://web-1:8475/capture", "web-1:8475", None),
        (
            "http://198.18.0.2:8475/capture",
            "http://198.18.0.2:8475/capture",
            "198.18.0.2:8475",
            None,
        ),
        ("http://[::1]:8475", "http://[::1]:8475/capture", "[::1]:8475", None),
        (
            "https://[2001:db8::7]/",
            "https://[2001:db8::7]:8475/capture",
            "[2001:db8::7]:8475",
            None,
        ),
        (
            "http://[fe80::1%25eth0]:9",
            "http://[fe80::1%25eth0]:9/capture",
            "[fe80::1%25eth0]:9",
            None,
        ),
        ("http://proxy/ddump/capture", "http://proxy:8475/ddump/capture", "proxy:8475", None),
        (
            "http://h?filter=icmp%20and%20host%201.1.1.1",
            "http://h:8475/capture?filter=icmp%20and%20host%201.1.1.1",
            "h:8475",
            "icmp and host 1.1.1.1",
        ),
        (
            "http://h?filter=tcp+port+80",
            "http://h:8475/capture?filter=tcp%20port%2080",
            "h:8475",
            "tcp port 80",
        ),
        (
            "http://h?filter=tcp port 80",
            "http://h:8475/capture?filter=tcp%20port%2080",
            "h:8475",
            "tcp port 80",
        ),
        ("http://h?filter=a%26%26b", "http://h:8475/capture?filter=a%26%26b", "h:8475", "a&&b"),
        (
            "http://h/capture?snaplen=128&filter=icmp&count=10&duration=5",
            "http://h:8475/capture?filter=icmp&snaplen=128&count=10&duration=5",
            "h:8475",
            "icmp",
        ),
        ("http://h?", "http://h:8475/capture", "h:8475", None),
    ],
)
def test_url_grammar(text: str, url: str, name: str, filter_: str | None) -> None:
    parsed = parse_target(text)
    assert (parsed.url, parsed.name, parsed.filter) == (url, name, filter_)
    assert (parsed.username, parsed.password) == (None, None)


def test_default_filter_applies_only_when_the_url_has_none() -> None:
    assert parse_target("http://h", default_filter="not port 22").url == (
        "http://h:8475/capture?filter=not%20port%2022"
    )
    assert parse_target("http://h?filter=icmp", default_filter="not port 22").filter == "icmp"


def test_default_filter_goes_first_before_passed_through_parameters() -> None:
    parsed = parse_target("http://h?snaplen=96", default_filter="udp")
    assert parsed.url == "http://h:8475/capture?filter=udp&snaplen=96"


def test_an_explicit_empty_filter_captures_everything_despite_a_default() -> None:
    parsed = parse_target("http://h?filter=", default_filter="not port 22")
    assert (parsed.url, parsed.filter) == ("http://h:8475/capture", None)


@pytest.mark.parametrize(
    ("text", "username", "password"),
    [
        ("http://ops:hunter2@web-1", "ops", "hunter2"),
        ("http://ops@web-1", "ops", None),
        ("http://ops:@web-1", "ops", ""),
        ("http://ops:hun%40ter%3A2%2F%23@web-1", "ops", "hun@ter:2/#"),
        ("http://ops:hun@ter2@web-1", "ops", "hun@ter2"),
        ("http://%C3%A9quipe:hunter2@web-1", "équipe", "hunter2"),
        ("https://ops:hunter2@[::1]:443/capture?filter=icmp", "ops", "hunter2"),
    ],
)
def test_credentials_are_decoded_and_kept_out_of_url_name_and_repr(
    text: str, username: str, password: str | None
) -> None:
    parsed = parse_target(text)
    assert (parsed.username, parsed.password) == (username, password)
    for shown in (parsed.url, parsed.name, repr(parsed), str(parsed)):
        assert "hunter2" not in shown and "hun@ter" not in shown
        assert "@" not in shown.split("?")[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty target URL"),
        ("web-1", "target URL without a scheme: did you mean http://web-1?"),
        ("web-1:8475", "did you mean http://web-1:8475?"),
        ("::1", "did you mean http://[::1]?"),
        ("http:web-1", "'http:' must be followed by '//': did you mean http://web-1?"),
        ("https:/web-1", "'https:' must be followed by '//': did you mean https://web-1?"),
        ("ftp://web-1", "bad target URL ftp://web-1: unsupported scheme 'ftp': use http or https"),
        ("http://", "missing host"),
        ("http:///capture", "missing host"),
        ("http://:8475", "missing host"),
        ("http://web-1:http", "bad port 'http': expected a number from 1 to 65535"),
        ("http://web-1:0", "port 0 is out of range"),
        ("http://web-1:65536", "port 65536 is out of range"),
        ("http://web-1:", "empty port: leave out the ':' to use 8475"),
        ("http://web-1/capture#top", "a URL fragment ('#...') is not allowed"),
        ("http://::1:8475", "write an IPv6 address in brackets: http://[::1:8475]:8475"),
        ("http://[::1:8475", "missing ']' after the IPv6 address"),
        ("http://[::1]8475", "unexpected '8475' after the IPv6 address"),
        ("http://[web-1]", "[web-1] is not an IPv6 address"),
        ("http://[::g]", "bad IPv6 address '::g'"),
        ("http://web 1", "bad host 'web 1'"),
        (
            "http://h?filter=tcp&&udp",
            "empty query parameter (a '&' inside a filter must be written %26)",
        ),
        ("http://h?filter=tcp&udp", "query parameter 'udp' has no value"),
        ("http://h?=1", "query parameter '=1' has no name"),
        ("http://h?filter=icmp&filter=udp", "query parameter 'filter' is given twice"),
    ],
)
def test_bad_urls_are_usage_errors_that_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_target(text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        "ops:hun-ter2@web-1",
        "http:ops:hun-ter2@web-1",
        "ftp://ops:hun-ter2@web-1",
        "http://ops:hun-ter2@",
        "http://ops:hun-ter2@web-1:99999",
        "http://ops:hun#ter2@web-1",
        "http://ops:hun/ter2@web-1",
        "http://ops:hun?ter2@web-1",
        "http://ops:hun-ter2@web-1?filter=a&&b",
    ],
)
def test_error_messages_never_show_a_password(text: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_target(text)
    assert "hun" not in str(error.value) and "ter2" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            "connecting to http://ops:hunter2@web-1:8475/capture failed",
            "connecting to http://ops:***@web-1:8475/capture failed",
        ),
        (
            "a http://u:one@a, b https://v:two@b:443/x?filter=icmp.",
            "a http://u:***@a, b https://v:***@b:443/x?filter=icmp.",
        ),
        ("bad target 'HTTPS://u:pw@h'\n", "bad target 'HTTPS://u:***@h'\n"),
        ("<http://u:pw@h>", "<http://u:***@h>"),
        ("http://ops:hun@ter2@web-1/capture", "http://ops:***@web-1/capture"),
        ("http://ops:hun/ter2@web-1", "http://ops:***@web-1"),
        ("http://ops:@web-1", "http://ops:***@web-1"),
        ("http://ops@web-1:8475/capture?filter=icmp", "http://ops@web-1:8475/capture?filter=icmp"),
        ("http://web-1:8475/capture", "http://web-1:8475/capture"),
        ("user:password@host is not a URL; ok", "user:password@host is not a URL; ok"),
        ("", ""),
    ],
)
def test_redact_hides_the_password_of_every_url_in_a_message(text: str, redacted: str) -> None:
    assert redact(text) == redacted
    assert redact(redacted) == redacted


@given(
    user=st.text(min_size=1, max_size=12),
    password=st.text(min_size=8, max_size=24),
    capture_filter=st.text(max_size=40),
)
def test_any_percent_encoded_credentials_and_filter_round_trip(
    user: str, password: str, capture_filter: str
) -> None:
    assume(capture_filter.strip())
    text = f"https://{quote(user, safe='')}:{quote(password, safe='')}@web-1:443/capture"
    parsed = parse_target(f"{text}?filter={quote(capture_filter, safe='')}")
    assert (parsed.username, parsed.password, parsed.filter) == (user, password, capture_filter)
    assume(quote(password, safe="") not in quote(user, safe=""))
    assert quote(password, safe="") not in redact(f"GET {text} failed")
    assert repr(parsed) == repr(replace(parsed, password=None))
    without_credentials = f"https://web-1:443/capture?filter={quote(capture_filter, safe='')}"
    assert parsed.url == parse_target(without_credentials).url


def test_unique_names_numbers_targets_that_share_name_and_filter() -> None:
    named = unique_names([target("a"), target("b"), target("a"), target("a")])
    assert [t.name for t in named] == ["a", "b", "a#2", "a#3"]


def test_unique_names_tells_apart_targets_on_one_worker_by_their_filter() -> None:
    targets = [
        parse_target("http://h?filter=icmp%20and%20host%201.1.1.1"),
        parse_target("http://h?filter=icmp%20and%20host%208.8.8.8"),
        parse_target("http://h"),
    ]
    assert [t.name for t in unique_names(targets)] == [
        "h:8475 (icmp and host 1.1.1.1)",
        "h:8475 (icmp and host 8.8.8.8)",
        "h:8475 (no filter)",
    ]


def test_unique_names_shortens_long_filters_and_still_numbers_collisions() -> None:
    long = "tcp port 80 and host 198.18.0.2 and not " * 2
    named = unique_names([target("h", long + "a"), target("h", long + "b"), target("h")])
    assert [t.name for t in named] == [
        "h (tcp port 80 and host 198.18.0.2…)",
        "h (tcp port 80 and host 198.18.0.2…)#2",
        "h (no filter)",
    ]


def test_unique_names_does_not_reuse_a_name_already_taken() -> None:
    named = unique_names([target("a"), target("a"), target("a#2")])
    assert [t.name for t in named] == ["a", "a#3", "a#2"]


def test_unique_names_keeps_everything_but_the_name() -> None:
    original = parse_target("http://ops:pw@h?filter=icmp")
    (renamed,) = unique_names([original])
    assert renamed == original
