"""The CLI's command line: durations in exact nanoseconds, help sized to the terminal."""

from __future__ import annotations

import argparse

import pytest

from ddump.cli.options import build_parser, parse_seconds


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2", 2_000_000_000),
        ("0.25", 250_000_000),
        (".5s", 500_000_000),
        ("250ms", 250_000_000),
        (" 1.5 us ", 1_500),
        ("1m", 60_000_000_000),
        ("0.1", 100_000_000),  # a float would give 100000000.00000001
        ("1.9ns", 1),  # below a nanosecond: cut, never rounded up
        ("123456789.123456789", 123_456_789_123_456_789),
    ],
)
def test_durations_are_exact_integer_nanoseconds(text: str, ns: int) -> None:
    assert parse_seconds(text) == ns


@pytest.mark.parametrize("text", ["", "x", "1.", "-1", "1e3", "5h"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        parse_seconds(text)


def test_help_is_wrapped_to_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")

    help_text = build_parser().format_help()

    # Options are wrapped; the description, the epilog and group titles are kept as written.
    options = help_text[help_text.index("\noptions:") : help_text.index("\nexamples:")]
    indented = [line for line in options.splitlines() if line.startswith(" ")]
    assert "--immediate-mode" in options
    assert max(len(line) for line in indented) <= 60
