"""The Debian package's files, checked without building: the worker's unit is hardened as the
issue asks and passes systemd's own checks, the default options are real worker options and
serve localhost only, and versions and dependencies agree with pyproject.toml."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ddump
from ddump.worker.listen import TcpListen, parse_listen
from ddump.worker.main import build_parser
from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
DEBIAN = PACKAGING / "debian"
UNIT = DEBIAN / "ddump-worker.service"
DEFAULTS = DEBIAN / "ddump-worker.default"
# Each exposure point below this needs a reason in the unit (capture needs the host's network,
# AF_PACKET, CAP_NET_RAW...): a change that raises it should be a decision, not an accident.
MAX_EXPOSURE = 1.6


def unit_settings(section: str) -> list[tuple[str, str]]:
    """A section's key=value lines in order; keys like SystemCallFilter= may repeat."""
    settings, current = [], ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"no continuation lines, please: {line}"
        if line.startswith("["):
            current = line
        elif current == section:
            key, equals, value = line.partition("=")
            assert equals, f"not key=value: {line}"
            settings.append((key, value))
    return settings


def service(key: str) -> list[str]:
    return [value for k, value in unit_settings("[Service]") if k == key]


def environment_file(text: str) -> dict[str, str]:
    """Parse KEY="value" lines the way systemd's EnvironmentFile= and sh agree on.

    Only that common subset is allowed (no `$`, backslash, backquote or inner double quote), so
    the file means the same to the unit and to deb-test.sh, which reads it with sh.
    """
    variables = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        match = re.fullmatch(r'([A-Za-z_][A-Za-z0-9_]*)="([^"\\$`]*)"', line)
        assert match, f'ddump-worker.default:{number}: not KEY="value": {line!r}'
        variables[match[1]] = match[2]
    return variables


def commented_examples(text: str) -> list[str]:
    return re.findall(r'^#DDUMP_WORKER_OPTS="([^"]*)"$', text, flags=re.MULTILINE)


def test_unit_never_runs_as_root_and_holds_only_cap_net_raw() -> None:
    assert service("DynamicUser") == ["yes"]
    assert not service("User") and not service("Group")
    assert service("AmbientCapabilities") == ["CAP_NET_RAW"]
    assert service("CapabilityBoundingSet") == ["CAP_NET_RAW"]
    assert service("NoNewPrivileges") == ["yes"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RuntimeDirectory", "ddump"),
        ("Restart", "on-failure"),
        ("EnvironmentFile", "-/etc/default/ddump-worker"),
    ],
)
def test_unit_sets_hardening_key(key: str, value: str) -> None:
    assert service(key) == [value]


def test_unit_allows_exactly_the_address_families_capture_and_serving_use() -> None:
    (families,) = service("RestrictAddressFamilies")
    assert sorted(families.split()) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_UNIX"]


def test_unit_system_calls_start_from_the_system_service_set() -> None:
    filters = service("SystemCallFilter")
    assert filters[0] == "@system-service"
    assert "~@privileged @resources" in filters


def test_unit_has_documentation_that_the_package_ships() -> None:
    (documentation,) = [v for k, v in unit_settings("[Unit]") if k == "Documentation"]
    assert documentation.split() == ["man:ddump-worker(1)", "man:ddump(1)"]
    rules = (DEBIAN / "rules").read_text()
    assert "usr/share/man/man1/ddump-worker.1" in rules and "usr/share/man/man1/ddump.1" in rules


def test_unit_keeps_shell_quoting_of_worker_options() -> None:
    """`--exclude 'tcp port 443'` must reach the worker as two arguments, not four."""
    (execstart,) = service("ExecStart")
    assert "/usr/bin/ddump-worker" in execstart
    # Run the unit's command line as systemd would ($$ is a literal $), printing argv instead.
    argv = shlex.split(execstart.replace("$$", "$"))
    argv[-1] = argv[-1].replace("exec /usr/bin/ddump-worker", "printf '%s\\n'")
    out = subprocess.run(
        argv,
        env={"DDUMP_WORKER_OPTS": "--listen 127.0.0.1:8475 --exclude 'tcp port 443'"},
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    assert out.splitlines() == ["--listen", "127.0.0.1:8475", "--exclude", "tcp port 443"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    # --man=no: the man pages exist only once the package is installed (deb-test.sh checks them).
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr


def test_unit_security_exposure_stays_low(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_default_file_is_an_environment_file_with_the_worker_options_only() -> None:
    assert set(environment_file(DEFAULTS.read_text())) == {"DDUMP_WORKER_OPTS"}


def test_packaged_worker_listens_on_loopback_only() -> None:
    opts = shlex.split(environment_file(DEFAULTS.read_text())["DDUMP_WORKER_OPTS"])
    args = build_parser().parse_args(opts)
    assert parse_listen(args.listen) == TcpListen("127.0.0.1", 8475)
    assert service("IPAddressDeny") == ["any"] and service("IPAddressAllow") == ["localhost"]


def test_default_and_example_options_are_accepted_by_the_worker() -> None:
    text = DEFAULTS.read_text()
    option_lines = [environment_file(text)["DDUMP_WORKER_OPTS"], *commented_examples(text)]
    assert len(option_lines) >= 2, "the default file should show an --exclude example"
    for line in option_lines:
        args = build_parser().parse_args(shlex.split(line))  # exits on an unknown option
        parse_listen(args.listen)


def test_default_file_names_only_real_worker_options() -> None:
    help_text = subprocess.run(
        [sys.executable, "-c", "from ddump.worker.main import main; main()", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    documented = set(re.findall(r"^#\s+(--[a-z][a-z-]*)", DEFAULTS.read_text(), re.MULTILINE))
    assert documented, "the default file should list the worker's options"
    assert documented <= set(re.findall(r"--[a-z][a-z-]*", help_text))


def test_package_version_is_the_project_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"ddump \(([^)]+)\) \S+; urgency=\S+", first)
    assert match, first
    assert match[1] == project["version"] == ddump.__version__


def test_package_depends_on_what_pyproject_requires_and_on_tcpdump() -> None:
    control = (DEBIAN / "control").read_text()
    binary = control[control.index("\nPackage: ddump") :]
    depends = binary[binary.index("Depends:") : binary.index("Description:")]
    debian_name = {
        "tornado": "python3-tornado",
        "pyyaml": "python3-yaml",
        "certifi": "python3-certifi",
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:>=(.+))?", requirement)
        assert match, f"unexpected requirement form: {requirement}"
        name, floor = match.groups()
        wanted = debian_name[name.lower()] + (f" (>= {floor})" if floor else "")
        assert f" {wanted}," in depends, f"Depends lacks {wanted!r}"
    assert " tcpdump," in depends


def test_package_builds_with_debhelper_13_and_the_pybuild_pyproject_plugin() -> None:
    control = (DEBIAN / "control").read_text()
    for build_dependency in ("debhelper-compat (= 13)", "dh-python", "pybuild-plugin-pyproject"):
        assert f" {build_dependency},\n" in control
    assert "--buildsystem=pybuild" in (DEBIAN / "rules").read_text()


def test_docs_and_examples_the_package_ships_exist() -> None:
    """dh_installdocs and dh_installexamples fail the build on a missing file: fail here first."""
    for listing in ("ddump.docs", "ddump.examples"):
        for name in (DEBIAN / listing).read_text().split():
            assert (REPO / name).is_file(), f"packaging/debian/{listing} names {name}: missing"
    examples = [Path(name).name for name in (DEBIAN / "ddump.examples").read_text().split()]
    for path in re.findall(r"/usr/share/doc/ddump/examples/(\S+)", DEFAULTS.read_text()):
        assert path in examples


@pytest.mark.parametrize("script", ["build-deb.sh", "deb-test.sh"])
def test_packaging_script_is_valid_bash(script: str) -> None:
    subprocess.run(["bash", "-n", str(PACKAGING / script)], check=True, timeout=10)
