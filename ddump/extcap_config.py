"""What ddump tells Wireshark about itself: the extcap sentences (interfaces, DLTs, options).

Pure code. The grammar is Wireshark's extcap(4): one sentence a line, `kind {key=value}...`.
Wireshark's parser ends a value at the first "}" that a "{", a blank or the line's end follows,
and reads no escapes, so a value never holds braces or a newline (`_clean`); validation
patterns avoid backslashes and braces for the same reason.

The preference behind an option is `extcap.ddump.<call without dashes>` (tshark -o), so calls
are single words where they can be: `--max-delay` is `extcap.ddump.maxdelay`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ddump import __version__
from ddump.pcap import DEFAULT_SNAPLEN, LINKTYPE_LINUX_SLL2

INTERFACE = "ddump"
ALL_GROUPS = ""  # the group selector's first value: every target of the inventory
# A duration as ddump --max-delay reads it ("250ms", "0.5", "2s"); no backslash, no brace.
DURATION_PATTERN = "^ *[0-9]*[.]?[0-9]+ *(ns|us|ms|s|m)? *$"


@dataclass(frozen=True)
class Option:
    """One field of Wireshark's options dialog for the ddump interface."""

    number: int
    call: str
    display: str
    type: str  # extcap(4): string, unsigned, boolflag, fileselect, selector, ...
    tooltip: str
    group: str
    default: str | None = None
    placeholder: str | None = None
    validation: str | None = None
    range: tuple[int, int] | None = None
    reload: bool = False
    mustexist: bool = False

    @property
    def name(self) -> str:
        """The option's name after `--`: what the capture is called with."""
        return self.call.removeprefix("--")


TARGETS, TLS, CAPTURE = "Targets", "TLS", "Capture"

OPTIONS: tuple[Option, ...] = (
    Option(
        0, "--inventory", "Inventory file", "fileselect",
        "A YAML inventory of ddump-workers (see configs/fleet.yaml). Passwords are never typed "
        "here: they come from the inventory's password_env or password_file, or from "
        "DDUMP_PASSWORD in Wireshark's environment",
        TARGETS, mustexist=True,
    ),
    Option(
        1, "--group", "Group", "selector",
        "Capture only this group of the inventory. Press the button after choosing or "
        "editing the inventory to read its groups again",
        TARGETS, reload=True, placeholder="Read the inventory's groups",
    ),
    Option(
        2, "--targets", "Targets", "string",
        "Worker URLs or capture files, separated by spaces, e.g. http://web-1 "
        "https://ops@db-1:443/capture?filter=icmp (percent-encode spaces in a URL). A URL with a "
        "user but no password takes the password from DDUMP_PASSWORD",
        TARGETS, placeholder="http://web-1 http://web-2",
    ),
    Option(
        3, "--filter", "Capture filter", "string",
        "BPF filter for targets whose URL or inventory entry gives none. Wireshark's own "
        "capture filter field, when filled in, takes its place",
        CAPTURE, placeholder="tcp port 443",
    ),
    Option(
        4, "--snaplen", "Snapshot length", "unsigned",
        "Keep at most this many bytes of each packet; 0: whole packets. A small one, e.g. 200 "
        "for headers, lets busy hosts drop far fewer packets",
        CAPTURE, default="0", range=(0, DEFAULT_SNAPLEN),
    ),
    Option(
        5, "--batch", "Batch mode", "boolflag",
        "For busy hosts: tcpdump hands packets over in blocks, needing several times less CPU "
        "and dropping far fewer, but packets show up to about 1 s later",
        CAPTURE,
    ),
    Option(
        6, "--max-delay", "Max delay", "string",
        "Longest time a quiet target may hold back the others' packets, e.g. 250ms or 1s. "
        "Packets arriving later are still shown, out of order",
        CAPTURE, default="250ms", validation=DURATION_PATTERN,
    ),
    Option(
        7, "--reconnect", "Reconnect", "boolflag",
        "Retry a target that fails, waiting 1 s doubling to 30 s between tries",
        CAPTURE,
    ),
    Option(
        8, "--ca", "CA certificates", "fileselect",
        "Trust only these CA certificates (PEM) for https targets (default: SSL_CERT_FILE, "
        "SSL_CERT_DIR, the system store)",
        TLS, mustexist=True,
    ),
    Option(
        9, "--cert", "Client certificate", "fileselect",
        "Client certificate chain (PEM) for mutual TLS; needs the key",
        TLS, mustexist=True,
    ),
    Option(
        10, "--key", "Client key", "fileselect",
        "Private key (PEM) of the client certificate",
        TLS, mustexist=True,
    ),
)  # fmt: skip


def _clean(text: str) -> str:
    """A value Wireshark's sentence parser reads back whole."""
    return " ".join(text.replace("{", "(").replace("}", ")").split())


def sentence(kind: str, fields: Iterable[tuple[str, object]]) -> str:
    """`kind {key=value}...`, with booleans as true/false and None fields left out."""
    parts = []
    for key, value in fields:
        if value is None or value is False:
            continue
        text = "true" if value is True else str(value)
        parts.append(f"{{{key}={_clean(text)}}}")
    return f"{kind} {''.join(parts)}"


def interfaces_sentences() -> list[str]:
    """The answer to --extcap-interfaces."""
    return [
        sentence("extcap", [("version", __version__), ("display", "ddump")]),
        sentence(
            "interface",
            [("value", INTERFACE), ("display", "Merged capture of ddump-workers")],
        ),
    ]


def dlts_sentences() -> list[str]:
    """The answer to --extcap-dlts: pcapng names each packet's own link type; this is the usual."""
    return [
        sentence(
            "dlt",
            [
                ("number", LINKTYPE_LINUX_SLL2),
                ("name", "LINUX_SLL2"),
                ("display", "Linux cooked v2, one pcapng interface per host and interface"),
            ],
        )
    ]


def option_sentence(option: Option) -> str:
    fields: list[tuple[str, object]] = [
        ("number", option.number),
        ("call", option.call),
        ("display", option.display),
        ("tooltip", option.tooltip),
        ("placeholder", option.placeholder),
        ("type", option.type),
    ]
    if option.range is not None:
        fields.append(("range", f"{option.range[0]},{option.range[1]}"))
    fields += [
        ("default", option.default),
        ("validation", option.validation),
        ("mustexist", option.mustexist),
        ("reload", option.reload),
        ("group", option.group),
    ]
    return sentence("arg", fields)


def group_value_sentences(
    option: Option, groups: Sequence[tuple[str, int]], note: str
) -> list[str]:
    """The group selector's values: every target first, then each (group, target count).

    `note` says what the first value stands for (the inventory's size, or why it is unread).
    """
    lines = [
        sentence(
            "value",
            [
                ("arg", option.number),
                ("value", ALL_GROUPS),
                ("display", note),
                ("default", True),
            ],
        )
    ]
    for name, count in groups:
        display = f"{name} ({count} target{'s' if count != 1 else ''})"
        lines.append(
            sentence("value", [("arg", option.number), ("value", name), ("display", display)])
        )
    return lines


def option_named(name: str) -> Option | None:
    """The option whose call is `--name`, or None."""
    return next((o for o in OPTIONS if o.name == name), None)


def config_sentences(groups: Sequence[tuple[str, int]], note: str) -> list[str]:
    """The answer to --extcap-config: every option, then the group selector's values."""
    group = option_named("group")
    assert group is not None
    return [option_sentence(o) for o in OPTIONS] + group_value_sentences(group, groups, note)
