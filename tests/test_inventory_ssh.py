"""Inventory targets with `scheme: ssh`: user, port, sudo, ssh_options; errors as file:LINE."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddump.cli.main import collect_targets
from ddump.cli.options import parse_args
from ddump.errors import UsageError
from ddump.ssh_targets import SshTarget
from tests.test_inventory import write

FLEET = """\
defaults:
  scheme: ssh
  user: ops
  sudo: true
  filter: "not port 22"
  ssh_options: [ProxyJump=bastion, "ServerAliveInterval 10"]
targets:
  - web-1
  - name: db
    host: 198.18.0.3
    port: 2222
    sudo: false
    filter: "tcp port 5432"
  - url: ssh://admin@lb?batch=1
  - name: worker
    url: http://198.18.0.9/capture
"""


def test_ssh_targets_take_the_defaults_and_their_own_settings(tmp_path: Path) -> None:
    targets = collect_targets(parse_args(["-f", write(tmp_path, FLEET)]))

    options = ("ProxyJump=bastion", "ServerAliveInterval 10")
    assert targets[:3] == [
        SshTarget("web-1", "web-1", "ops", None, "not port 22", sudo=True, ssh_options=options),
        SshTarget("db", "198.18.0.3", "ops", 2222, "tcp port 5432", ssh_options=options),
        SshTarget(
            "lb", "lb", "admin", None, "not port 22", batch=True, sudo=True, ssh_options=options
        ),
    ]
    assert not isinstance(targets[3], SshTarget)  # a worker URL stays a worker target
    assert targets[3].url == "http://198.18.0.9:8475/capture?filter=not%20port%2022"


def test_command_line_sudo_snaplen_and_batch_apply_to_ssh_targets(tmp_path: Path) -> None:
    path = write(tmp_path, "targets:\n  - {host: web-1, scheme: ssh}\n")

    (target,) = collect_targets(parse_args(["-f", path, "--sudo", "-s", "200", "--batch"]))

    assert isinstance(target, SshTarget)
    assert (target.sudo, target.snaplen, target.batch) == (True, 200, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "targets:\n  - host: web-1\n    scheme: ssh\n    ssh_options:\n      - BatchMode=no\n",
            "fleet.yaml:5: ssh option BatchMode is set by ddump",
        ),
        (
            "targets:\n  - host: web-1\n    sudo: true\n",
            "fleet.yaml:3: sudo is for ssh targets (scheme: ssh)",
        ),
        (
            "targets:\n  - host: web-1\n    scheme: ssh\n    ca: ca.pem\n",
            "fleet.yaml:4: ca is not for ssh targets",
        ),
        (
            "targets:\n  - host: web-1\n    scheme: ssh\n    ssh_options: ProxyJump=x\n",
            "fleet.yaml:4: ssh_options must be a list",
        ),
        (
            "targets:\n  - url: ssh://ops:pw@web-1\n",
            "fleet.yaml:2: bad target URL ssh://ops:***@web-1: no password",
        ),
    ],
)
def test_ssh_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        collect_targets(parse_args(["-f", write(tmp_path, text)]))

    assert message in str(caught.value)


def test_an_ssh_target_given_twice_is_captured_once_with_a_warning() -> None:
    warnings: list[str] = []

    targets = collect_targets(
        parse_args(["ssh://web-1?filter=udp", "SSH://web-1?filter=udp", "ssh://web-1"]),
        warnings.append,
    )

    assert [t.name for t in targets] == ["web-1 (udp)", "web-1 (no filter)"]
    assert warnings == ["ssh://web-1?filter=udp is given twice: captured once, as web-1"]
