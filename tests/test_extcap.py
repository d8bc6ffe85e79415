"""ddump-extcap answering Wireshark's calls, read back as Wireshark's own parser reads them.

`parse` follows extcap_parser.c: a sentence kind, then `{key=value}` fields, a value ending at the
first "}" followed by "{", a blank or the line's end. The runs with the real tshark are in
tests/test_extcap_tshark.py.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import pytest

from ddump.extcap import build_parser, ddump_argv, main
from ddump.extcap_config import OPTIONS
from ddump.extcap_install import install, launcher_text, parse_folders, parse_version

_SENTENCE = re.compile(r"^[\t ]*(arg|value|interface|extcap|dlt|control)(?=[\t ]+\{)", re.I)
_FIELD = re.compile(r"\{([a-zA-Z_-]*?)=(.*?)\}(?=\{|$|\s)")
TYPES = {"integer", "unsigned", "long", "double", "string", "password", "boolean", "boolflag",
         "fileselect", "selector", "editselector", "radio", "multicheck", "timestamp"}  # fmt: skip


def parse(text: str) -> list[tuple[str, dict[str, str]]]:
    """Every sentence of an extcap answer: (kind, fields); a line Wireshark would drop fails."""
    sentences = []
    for line in text.splitlines():
        match = _SENTENCE.match(line)
        assert match, f"Wireshark would ignore this line: {line!r}"
        fields = dict(_FIELD.findall(line))
        rebuilt = f"{match.group(1)} " + "".join(f"{{{k}={v}}}" for k, v in fields.items())
        assert rebuilt == line, f"a field would be misread: {line!r}"
        sentences.append((match.group(1), fields))
    return sentences


def call(*args: str) -> tuple[int, list[tuple[str, dict[str, str]]]]:
    out = io.StringIO()
    status = main(list(args), out=out)
    return status, parse(out.getvalue())


def config(*args: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """--extcap-config's args and values."""
    status, sentences = call("--extcap-interface", "ddump", "--extcap-config", *args)
    assert status == 0
    return [f for k, f in sentences if k == "arg"], [f for k, f in sentences if k == "value"]


def test_interfaces_name_the_ddump_interface_and_the_version() -> None:
    status, sentences = call("--extcap-interfaces", "--extcap-version=4.0")

    assert status == 0
    kinds = dict(sentences)
    assert kinds["extcap"]["version"] == __import__("ddump").__version__
    assert kinds["interface"]["value"] == "ddump"


def test_dlts_give_linux_cooked_v2() -> None:
    status, sentences = call("--extcap-interface", "ddump", "--extcap-dlts")

    assert status == 0
    assert sentences == [("dlt", sentences[0][1])]
    assert sentences[0][1]["number"] == "276" and sentences[0][1]["name"] == "LINUX_SLL2"


def test_config_names_every_option_with_a_display_a_tooltip_and_a_known_type() -> None:
    args, _ = config()

    names = [a["call"] for a in args]
    assert names == ["--inventory", "--group", "--targets", "--filter", "--snaplen", "--batch",
                     "--max-delay", "--reconnect", "--ca", "--cert", "--key"]  # fmt: skip
    assert len({a["number"] for a in args}) == len(args)
    for arg in args:
        assert arg["display"] and arg["tooltip"] and arg["type"] in TYPES, arg
    by_call = {a["call"]: a for a in args}
    assert by_call["--inventory"]["type"] == "fileselect"
    assert by_call["--group"]["type"] == "selector" and by_call["--group"]["reload"] == "true"
    # Wireshark passes an unsigned field's 0 when left alone: 0 must be in range, and mean "all".
    assert by_call["--snaplen"]["range"] == "0,262144" and by_call["--snaplen"]["default"] == "0"
    assert {by_call[c]["type"] for c in ("--batch", "--reconnect")} == {"boolflag"}


def test_no_option_asks_for_a_password() -> None:
    args, _ = config()

    assert all(a["type"] != "password" and "pass" not in a["call"] for a in args)
    assert "password_env" in next(a for a in args if a["call"] == "--inventory")["tooltip"]


def test_max_delay_validation_takes_what_ddump_takes() -> None:
    args, _ = config()
    pattern = next(a for a in args if a["call"] == "--max-delay")["validation"]

    for good in ("250ms", "1s", "0.5", "2 s", "1m"):
        assert re.fullmatch(pattern, good), good
    for bad in ("fast", "1h", "-1s", ""):
        assert not re.fullmatch(pattern, bad), bad


INVENTORY = """\
targets:
  - 198.18.0.1
groups:
  web:
    - 198.18.0.2
    - 198.18.0.3
"""


def test_group_list_is_read_again_from_the_inventory_when_reloaded(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(INVENTORY)
    reload = ("--extcap-reload-option", "group", "--inventory", str(inventory))

    _, before = config(*reload)
    inventory.write_text(INVENTORY + "  db:\n    - 198.18.0.4\n")
    status, after = call("--extcap-interface", "ddump", "--extcap-config", *reload)

    assert [(v["value"], v["display"]) for v in before] == [
        ("", "all targets (3)"),
        ("web", "web (2 targets)"),
    ]
    assert status == 0 and all(kind == "value" for kind, _ in after)
    assert [v["value"] for _, v in after] == ["", "web", "db"]
    assert after[0][1]["default"] == "true"


def test_reload_takes_the_dialogs_fields_as_wireshark_passes_them(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(INVENTORY)

    _, values = config(
        "--extcap-reload-option", "group", "--inventory", str(inventory), "--batch", "true",
        "--reconnect", "false", "--max-delay", "250ms",
    )  # fmt: skip

    assert [v["value"] for v in values] == ["", "web"]


def test_a_refused_command_line_is_refused_with_the_fifo_opened_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    seen: list[bytes] = []
    # As dumpcap: it reads the FIFO, and would wait for ever if nobody opened it for writing.
    reader = threading.Thread(target=lambda: seen.append(fifo.read_bytes()), daemon=True)
    reader.start()

    status = main(["--capture", "--fifo", str(fifo), "--batch", "true"])
    reader.join(10)

    assert status == 2
    assert "unrecognized arguments: true" in capsys.readouterr().err
    assert seen == [b""]  # opened, then closed: the reader saw the end, no hang


def test_whole_config_lists_the_groups_of_a_given_inventory(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(INVENTORY)

    args, values = config("--inventory", str(inventory))

    assert len(args) == len(OPTIONS)
    group_number = next(a["number"] for a in args if a["call"] == "--group")
    assert [v["value"] for v in values] == ["", "web"]
    assert {v["arg"] for v in values} == {group_number}


def test_a_refused_inventory_says_why_in_the_group_list(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.yaml"
    inventory.write_text(INVENTORY + "    - nope nope\n")

    _, values = config("--extcap-reload-option", "group", "--inventory", str(inventory))

    assert "ddump refuses the inventory" in values[0]["display"]
    assert f"{inventory}:7" in values[0]["display"]
    assert [v["value"] for v in values] == ["", "web"]


def test_a_missing_inventory_is_named_in_the_group_list(tmp_path: Path) -> None:
    _, values = config("--extcap-reload-option", "group", "--inventory", str(tmp_path / "no"))

    assert values[0]["display"].startswith("inventory not read:")
    assert len(values) == 1


def test_capture_filter_check_prints_nothing_for_a_good_filter_and_libpcaps_reason_else() -> None:
    good, bad = io.StringIO(), io.StringIO()

    assert (
        main(["--extcap-capture-filter", "udp port 53", "--extcap-interface", "ddump"], good) == 0
    )
    assert main(["--extcap-capture-filter", "udp port", "--extcap-interface", "ddump"], bad) == 0

    assert good.getvalue() == ""
    assert "syntax error" in bad.getvalue()


def capture_args(*args: str) -> list[str]:
    ns = build_parser().parse_args(["--capture", "--fifo", "/x", *args])
    return ddump_argv(ns)


def test_dialog_options_become_a_pcapng_ddump_command_line() -> None:
    argv = capture_args(
        "--inventory", "f.yaml", "--group", "web", "--targets", " http://a  http://b ",
        "--filter", "udp", "--snaplen", "200", "--batch", "--max-delay", "1s", "--reconnect",
        "--ca", "ca.pem", "--cert", "c.pem", "--key", "c.key",
    )  # fmt: skip

    assert argv == [
        "--format", "pcapng", "--quiet", "--inventory", "f.yaml", "--group", "web",
        "--filter", "udp", "--snaplen", "200", "--max-delay", "1s", "--ca", "ca.pem",
        "--cert", "c.pem", "--key", "c.key", "--batch", "--reconnect", "--", "http://a", "http://b",
    ]  # fmt: skip


def test_wiresharks_capture_filter_field_takes_the_place_of_the_dialogs_filter() -> None:
    argv = capture_args(
        "--targets", "http://a", "--filter", "udp", "--extcap-capture-filter", "icmp"
    )

    assert argv[argv.index("--filter") + 1] == "icmp"


def test_every_target_and_empty_fields_add_nothing() -> None:
    argv = capture_args("--inventory", "f.yaml", "--group", "", "--snaplen", "0", "--ca", "")

    assert argv == ["--format", "pcapng", "--quiet", "--inventory", "f.yaml", "--"]


def test_capture_without_targets_or_inventory_says_where_to_give_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fifo"
    fifo.write_bytes(b"")  # a regular file opens without a reader

    status = main(["--capture", "--fifo", str(fifo), "--extcap-interface", "ddump"])

    assert status == 2
    assert "no targets: fill in Targets or Inventory file" in capsys.readouterr().err


def test_unknown_interface_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--extcap-interface", "eth0", "--extcap-dlts"]) == 2
    assert "unknown interface 'eth0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("version", "expected"),
    [("TShark (Wireshark) 4.0.17 (Git v4.0.17 packaged as 4.0.17-0+deb12u3).", (4, 0)),
     ("TShark (Wireshark) 4.2.5 (Git v4.2.5 packaged as 4.2.5-1).", (4, 2)),
     ("something else", None)],
)  # fmt: skip
def test_wireshark_version_is_read_from_tshark(
    version: str, expected: tuple[int, int] | None
) -> None:
    assert parse_version(version) == expected


def test_folders_are_read_from_tshark() -> None:
    text = (
        "Personal configuration:\t/home/u/.config/wireshark\nExtcap path:   \t/usr/lib/x/extcap\n"
    )

    assert parse_folders(text) == {
        "Personal configuration": "/home/u/.config/wireshark",
        "Extcap path": "/usr/lib/x/extcap",
    }


def test_install_writes_an_executable_launcher_for_this_python(tmp_path: Path) -> None:
    folders = [str(tmp_path / "a" / "extcap"), str(tmp_path / "b")]

    written = install(folders)

    assert written == [os.path.join(f, "ddump") for f in folders]
    for path in written:
        assert os.access(path, os.X_OK)
        assert Path(path).read_text() == launcher_text(__import__("sys").executable)


FOLDERS_4_0 = (
    "Personal configuration:\t/home/u/.config/wireshark\nExtcap path:\t/usr/lib/x/extcap\n"
)
FOLDERS_4_4 = (
    "Personal Extcap path:\t/home/u/.local/lib/wireshark/extcap\nGlobal Extcap path:\t/x\n"
)


@pytest.mark.parametrize(
    ("version", "folders", "expected"),
    [
        ("TShark (Wireshark) 4.0.17", FOLDERS_4_0, ["/home/u/.config/wireshark/extcap"]),
        ("TShark (Wireshark) 4.4.1", FOLDERS_4_4, ["/home/u/.local/lib/wireshark/extcap"]),
        ("TShark (Wireshark) 4.2.0", "", ["/h/.local/lib/wireshark/extcap"]),
        (None, None, ["/h/.local/lib/wireshark/extcap", "/xdg/wireshark/extcap"]),
    ],
)
def test_install_goes_where_the_installed_wireshark_looks(
    monkeypatch: pytest.MonkeyPatch, version: str | None, folders: str | None, expected: list[str]
) -> None:
    from ddump import extcap_install

    answers = {"--version": version, "-G": folders}
    monkeypatch.setattr(extcap_install, "_tshark", lambda *args: answers[args[0]])
    monkeypatch.setenv("HOME", "/h")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg")

    assert extcap_install.personal_folders() == expected


def test_warnings_stay_off_stderr_unless_the_capture_failed() -> None:
    from ddump.extcap import ExtcapReporter

    quiet, failed = io.StringIO(), io.StringIO()
    for stream in (quiet, failed):
        reporter = ExtcapReporter(stream)
        reporter.info("web-1:8475: capturing")
        reporter.warn("web-1:8475: its clock is 2 s ahead")
        reporter.summary([], 0, 0)
        if stream is failed:
            reporter.error("db-1:8475: connection refused")
            reporter.release_warnings()

    assert quiet.getvalue() == ""
    assert failed.getvalue().splitlines() == [
        "ddump: db-1:8475: connection refused",
        "ddump: warning: web-1:8475: its clock is 2 s ahead",
    ]
