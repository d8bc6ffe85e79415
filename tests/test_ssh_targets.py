"""`ssh://` targets: the URL grammar, the ssh command lines and the remote script, byte for byte."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddump.errors import UsageError
from ddump.ssh_command import (
    config_argv,
    configured_control_path,
    connection_failure,
    connection_lost,
    master_argv,
    read_clock,
    read_interface,
    remote_script,
    session_argv,
    session_failure,
)
from ddump.ssh_targets import SshTarget, check_ssh_option, is_ssh_url, parse_ssh_target


def test_full_url_is_read_into_its_parts() -> None:
    target = parse_ssh_target(
        "ssh://ops@web-2:2222?filter=tcp%20port%205432&snaplen=200&count=5&duration=1.5"
        "&batch=1&sudo=1"
    )

    assert target == SshTarget(
        name="web-2:2222",
        host="web-2",
        user="ops",
        port=2222,
        filter="tcp port 5432",
        snaplen=200,
        count=5,
        duration_ns=1_500_000_000,
        batch=True,
        sudo=True,
    )
    assert target.url == (
        "ssh://ops@web-2:2222?filter=tcp%20port%205432&snaplen=200&count=5&duration=1.5"
        "&batch=1&sudo=1"
    )


def test_bare_host_leaves_user_and_port_to_the_ssh_configuration() -> None:
    target = parse_ssh_target("ssh://web-1", default_filter="icmp")

    assert (target.name, target.user, target.port, target.filter) == ("web-1", None, None, "icmp")
    assert target.url == "ssh://web-1?filter=icmp"


def test_ipv6_literal_in_brackets() -> None:
    target = parse_ssh_target("ssh://[2001:db8::1]:22")

    assert (target.host, target.port, target.url) == ("2001:db8::1", 22, "ssh://[2001:db8::1]:22")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ssh://ops:secret@web-1", "no password in an ssh:// URL"),
        ("ssh://web-1/capture", "an ssh:// target has no path"),
        ("ssh://web-1?interface=eth0", "unknown parameter 'interface'"),
        ("ssh://web-1?sudo=yes", "sudo must be 0 or 1"),
        ("ssh://web-1?filter=(udp", "unbalanced parentheses"),
        ("ssh://web-1:0", "port 0 is out of range"),
        ("ssh://-oProxyCommand=x", "bad host"),
        ("ssh://web-1#frag", "fragment"),
        ("ssh://web-1?count=1&count=2", "given twice"),
    ],
)
def test_bad_urls_are_refused_with_why(url: str, message: str) -> None:
    with pytest.raises(UsageError, match="bad target URL") as caught:
        parse_ssh_target(url)

    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_ssh_urls_are_told_from_other_targets() -> None:
    assert is_ssh_url("SSH://web-1") and not is_ssh_url("https://web-1")


def test_ssh_options_ddump_sets_itself_are_refused() -> None:
    assert check_ssh_option("ProxyJump=bastion") == "ProxyJump=bastion"
    with pytest.raises(UsageError, match="BatchMode=yes"):
        check_ssh_option("BatchMode=no")
    with pytest.raises(UsageError, match="expected Key=Value"):
        check_ssh_option("-oProxyCommand=x")


def test_connection_and_session_command_lines() -> None:
    target = parse_ssh_target("ssh://ops@web-2:2222")
    target = SshTarget(**{**target.__dict__, "ssh_options": ("ProxyJump=bastion",)})

    common = [
        "ssh", "-o", "BatchMode=yes", "-o", "ControlPath=/run/d/1", "-e", "none",
        "-o", "ProxyJump=bastion", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3", "-p", "2222", "-l", "ops",
    ]  # fmt: skip
    assert master_argv(target, "/run/d/1", 10) == [
        *common, "-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "--", "web-2",
    ]  # fmt: skip
    assert session_argv(target, "/run/d/1", 10) == [
        *common, "-T", "-o", "ControlMaster=no", "--", "web-2", "exec sh -s",
    ]  # fmt: skip


def test_a_lone_session_leaves_the_control_path_to_the_users_configuration() -> None:
    target = parse_ssh_target("ssh://web-1")

    argv = session_argv(target, None, 10)

    assert not any(word.startswith("ControlPath") for word in argv)
    assert argv[-6:] == ["-T", "-o", "ControlMaster=no", "--", "web-1", "exec sh -s"]


def test_ssh_dash_g_reads_the_targets_own_options_and_finds_the_users_control_path() -> None:
    target = parse_ssh_target("ssh://ops@web-2:2222")
    target = SshTarget(**{**target.__dict__, "ssh_options": ("ProxyJump=bastion",)})

    assert config_argv(target) == [
        "ssh", "-G", "-T", "-o", "ProxyJump=bastion", "-p", "2222", "-l", "ops", "--", "web-2",
    ]  # fmt: skip
    shown = (
        "user ops\nhostname web-2\ncontrolmaster auto\ncontrolpath /home/o/.ssh/cm-ops@web-2:2222\n"
    )
    assert configured_control_path(shown) == "/home/o/.ssh/cm-ops@web-2:2222"
    assert configured_control_path("controlmaster false\ncontrolpath none\n") is None
    assert configured_control_path("user ops\n") is None


def test_remote_script_byte_for_byte() -> None:
    target = parse_ssh_target("ssh://web-1?filter=udp%27%3Bid%27&snaplen=200&count=3&sudo=1")

    assert remote_script(target) == (
        "{\n"
        'PATH="$PATH:/usr/sbin:/sbin"\n'
        "set -f; set -- $SSH_CONNECTION; set +f\n"
        'if [ "$#" -ne 4 ]; then\n'
        "  echo 'ddump: $SSH_CONNECTION is not set: cannot keep this session out of the "
        "capture' >&2\n"
        "  exit 120\n"
        "fi\n"
        'x="not (host $1 and host $3 and tcp port $2 and tcp port $4)"\n'
        "u='udp'\"'\"';id'\"'\"''\n"
        'f="$x and ($u)"\n'
        "for d in /sys/class/net/*; do\n"
        '  i=; read -r i < "$d/ifindex" 2>/dev/null'
        ' && printf \'ddump-interface %s %s\\n\' "$i" "${d##*/}" >&2\n'
        "done\n"
        "printf 'ddump-clock %s\\n' \"$(date +%s%N)\" >&2\n"
        "exec 3<&0\n"
        "sudo -n -- tcpdump -i any -U -w - --time-stamp-precision=nano --immediate-mode"
        ' -B 32768 -s 200 -c 3 -- "$f" </dev/null 3<&- &\n'
        "p=$!\n"
        '{ while read -r _ <&3; do :; done; kill -TERM "$p" 2>/dev/null; } &\n'
        "w=$!\n"
        'wait "$p"; s=$?\n'
        'kill "$w" 2>/dev/null\n'
        'exit "$s"\n'
        "}\n"
    )


def test_batch_target_runs_tcpdump_without_immediate_mode_and_no_filter_runs_only_ours() -> None:
    script = remote_script(parse_ssh_target("ssh://web-1?batch=1"))

    assert 'f="$x"\n' in script and "u=" not in script
    assert "tcpdump -i any -U -w - --time-stamp-precision=nano -B 32768 -s 262000 --" in script
    assert "sudo" not in script


_FILTER_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40
).filter(lambda text: text.strip() and text.count("(") == text.count(")") == 0)


@settings(max_examples=60, deadline=None)
@given(_FILTER_TEXT)
def test_any_filter_reaches_the_command_as_one_unchanged_argument(text: str) -> None:
    # The script's filter assignment, run by a real sh: `$u` holds the filter as it was.
    target = parse_ssh_target("ssh://h", default_filter=text)
    script = remote_script(target)
    assignment = script[script.index("\nu=") + 3 : script.rindex('\nf="$x and ($u)"')]
    result = subprocess.run(
        ["sh", "-c", f'u={assignment}\nprintf %s "$u"'],
        capture_output=True,
        timeout=10,
        check=True,
    )

    assert result.stdout.decode() == text.strip()


def test_script_lines_tell_the_clock_and_the_interfaces() -> None:
    assert read_clock("ddump-clock 1700000000123456789") == 1700000000123456789
    assert read_clock("ddump-clock 1700000000N") is None  # a date without %N
    assert read_interface("ddump-interface 2 eth 0") == (2, "eth 0")
    assert read_interface("tcpdump: listening on any") is None


def test_failures_say_what_happened_and_what_to_do() -> None:
    assert "its key changed since it was stored" in connection_failure(
        "web-1",
        "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.",
        255,
    )
    assert "check the user, your key" in connection_failure(
        "web-1", "ops@web-1: Permission denied (publickey).", 255
    )
    sudo = session_failure("ddump-clock 1\nsudo: a password is required\n", 1)
    assert sudo.startswith("sudo: a password is required\nsudo asks for a password")
    assert "NOPASSWD: /usr/bin/tcpdump" in sudo
    denied = session_failure(
        "tcpdump: any: You don't have permission to perform this capture on that device\n", 1
    )
    assert "add ?sudo=1" in denied
    assert "not installed" in session_failure("sh: 1: tcpdump: not found\n", 127)
    assert session_failure("tcpdump: can't parse filter expression: syntax error\n", 1) == (
        "can't parse filter expression: syntax error"
    )


def test_a_connection_lost_mid_capture_is_told_in_ssh_words_not_tcpdumps() -> None:
    started = (
        "ddump-clock 1700000000123456789\n"
        "tcpdump: data link type LINUX_SLL2\n"
        "tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2), snapshot length "
        "262000 bytes\n"
    )

    assert connection_lost("web-1", started, 255) == (
        "the SSH connection to web-1 was lost (ssh exited with status 255)"
    )
    assert (
        connection_lost("web-1", started + "Connection to web-1 closed by remote host.\n", 255)
        == "the SSH connection to web-1 was lost: Connection to web-1 closed by remote host."
    )
    assert (
        connection_lost("web-1", started + "Timeout, server web-1 not responding.\n", 255)
        == "the SSH connection to web-1 was lost: Timeout, server web-1 not responding."
    )
