"""The YAML inventory: targets, groups and defaults; every mistake reported as file:line."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from ddump.cli.main import collect_targets
from ddump.cli.options import parse_args
from ddump.errors import UsageError
from ddump.inventory import load_inventory
from ddump.ssh_targets import SshTarget
from ddump.targets import Target

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "fleet.yaml"


def write(directory: Path, text: str, name: str = "fleet.yaml") -> str:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def load(directory: Path, text: str, *groups: str, **environ: str) -> list[Target]:
    targets = load_inventory(write(directory, text), groups, environ=environ)
    assert all(isinstance(t, Target) for t in targets)
    return targets  # type: ignore[return-value]


def error_of(
    directory: Path, text: str, *groups: str, environ: Mapping[str, str] | None = None
) -> str:
    path = write(directory, text)
    with pytest.raises(UsageError) as error:
        load_inventory(path, groups, environ=environ or {})
    message = str(error.value)
    assert message.startswith(f"{path}:"), message
    return message[len(path) :]


def test_plain_host_names_get_the_default_port_path_and_scheme(tmp_path: Path) -> None:
    targets = load(
        tmp_path,
        """
        targets:
          - web-1.example.net
          - 198.18.0.2:9000
          - "::1"
          - "[2001:db8::7]:9000"
          - https://lb.example.net/capture?filter=icmp
        """,
    )
    assert [(t.name, t.url, t.filter) for t in targets] == [
        ("web-1.example.net:8475", "http://web-1.example.net:8475/capture", None),
        ("198.18.0.2:9000", "http://198.18.0.2:9000/capture", None),
        ("[::1]:8475", "http://[::1]:8475/capture", None),
        ("[2001:db8::7]:9000", "http://[2001:db8::7]:9000/capture", None),
        ("lb.example.net:8475", "https://lb.example.net:8475/capture?filter=icmp", "icmp"),
    ]


def test_a_target_mapping_takes_every_setting(tmp_path: Path) -> None:
    (target,) = load(
        tmp_path,
        """
        targets:
          - name: db-1
            host: 198.18.0.3
            scheme: https
            port: 443
            path: /ddump/capture
            filter: tcp port 5432
            username: ops
            password_env: DB_PASSWORD
            ca: /etc/ddump/ca.pem
            cert: /etc/ddump/client.pem
            key: /etc/ddump/client.key
        """,
        DB_PASSWORD="hunter2",
    )
    assert target == Target(
        name="db-1",
        url="https://198.18.0.3:443/ddump/capture?filter=tcp%20port%205432",
        filter="tcp port 5432",
        username="ops",
        password="hunter2",
        ca="/etc/ddump/ca.pem",
        cert="/etc/ddump/client.pem",
        key="/etc/ddump/client.key",
    )
    assert "hunter2" not in repr(target)


def test_defaults_apply_to_every_target_and_each_target_may_override_them(
    tmp_path: Path,
) -> None:
    targets = load(
        tmp_path,
        """
        defaults:
          scheme: https
          port: 443
          path: /capture
          filter: not port 22
        targets:
          - web-1
          - {host: web-2, port: 8443, filter: icmp}
          - {host: web-3, scheme: http, filter: null}
          - url: https://lb/capture?snaplen=96
        """,
    )
    assert [t.url for t in targets] == [
        "https://web-1:443/capture?filter=not%20port%2022",
        "https://web-2:8443/capture?filter=icmp",
        "http://web-3:443/capture",
        # A URL means what it means on the command line: only the default filter applies.
        "https://lb:8475/capture?filter=not%20port%2022&snaplen=96",
    ]


def test_relative_paths_are_relative_to_the_inventory_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    write(conf, "hunter2\nsecond line\n", "secrets/ddump.pass")
    write(
        conf,
        """
        defaults:
          ca: certs/ca.pem
          cert: ../client.pem
          key: /abs/client.key
          username: ops
          password_file: secrets/ddump.pass
        targets: [web-1]
        """,
    )
    monkeypatch.chdir(tmp_path)
    (target,) = load_inventory(str(Path("conf") / "fleet.yaml"), environ={})
    assert target.ca == str(conf / "certs" / "ca.pem")
    assert Path(str(target.cert)).resolve() == tmp_path / "client.pem"
    assert target.key == "/abs/client.key"
    assert target.password == "hunter2"


def test_passwords_come_from_the_environment_or_the_first_line_of_a_file(
    tmp_path: Path,
) -> None:
    write(tmp_path, "  s3cret-from-file \r\n", "edge.pass")
    targets = load(
        tmp_path,
        """
        defaults:
          username: ops
          password_env: DDUMP_PASSWORD
        targets:
          - web-1
          - {host: edge-1, password_file: edge.pass}
          - {host: open-1, username: null, password_env: null}
        """,
        DDUMP_PASSWORD="s3cret-from-env",
    )
    assert [(t.username, t.password) for t in targets] == [
        ("ops", "s3cret-from-env"),
        ("ops", "s3cret-from-file"),
        (None, None),
    ]


def test_a_url_target_may_carry_a_username_and_take_the_password_from_the_defaults(
    tmp_path: Path,
) -> None:
    (target,) = load(
        tmp_path,
        """
        defaults: {username: ops, password_env: PW}
        targets:
          - url: https://auditor@lb:443/capture
        """,
        PW="hunter2",
    )
    assert (target.url, target.username, target.password) == (
        "https://lb:443/capture",
        "auditor",
        "hunter2",
    )


FLEET = """
targets:
  - solo
groups:
  web:
    - web-1
    - &shared web-2
  db:
    - db-1
    - *shared
"""


def test_without_groups_every_target_is_returned_once_in_file_order(tmp_path: Path) -> None:
    assert [t.name for t in load(tmp_path, FLEET)] == [
        "solo:8475",
        "web-1:8475",
        "web-2:8475",
        "db-1:8475",
    ]


def test_selected_groups_return_only_their_targets_in_the_order_asked(tmp_path: Path) -> None:
    assert [t.name for t in load(tmp_path, FLEET, "web")] == ["web-1:8475", "web-2:8475"]
    assert [t.name for t in load(tmp_path, FLEET, "db", "web")] == [
        "db-1:8475",
        "web-2:8475",
        "web-1:8475",
    ]


def test_a_missing_password_only_matters_for_selected_targets(tmp_path: Path) -> None:
    text = """
    targets: [web-1]
    groups:
      vault:
        - {host: vault-1, username: ops, password_env: VAULT_PASSWORD}
      plain: [web-2]
    """
    assert [t.name for t in load(tmp_path, text, "plain")] == ["web-2:8475"]
    assert ":4: environment variable VAULT_PASSWORD is not set" in error_of(tmp_path, text)


def test_unselected_targets_are_still_checked(tmp_path: Path) -> None:
    text = "targets: [web-1]\ngroups:\n  other:\n    - {host: web-2, prot: 1}\n"
    assert error_of(tmp_path, text).startswith(":4: unknown key 'prot'")


def test_merge_keys_share_settings_between_targets(tmp_path: Path) -> None:
    targets = load(
        tmp_path,
        """
        targets:
          - &db {name: db-1, host: 198.18.0.3, filter: tcp port 5432}
          - {<<: *db, name: db-2, host: 198.18.0.4}
        """,
    )
    assert [(t.name, t.filter) for t in targets] == [
        ("db-1", "tcp port 5432"),
        ("db-2", "tcp port 5432"),
    ]


def test_the_example_inventory_loads_as_documented(tmp_path: Path) -> None:
    copy = write(tmp_path, EXAMPLE.read_text())
    write(tmp_path, "edge-secret\n", "secrets/edge.pass")
    every = load_inventory(copy, environ={"DDUMP_PASSWORD": "pw"})
    over_ssh = [t for t in every if isinstance(t, SshTarget)]
    assert [(t.name, t.user, t.sudo, t.ssh_options) for t in over_ssh] == [
        ("cache-1", "ops", True, ("ProxyJump=bastion.example.net",)),
        ("cache-2.example.net", "ops", True, ()),
    ]
    targets = [t for t in every if isinstance(t, Target)]
    assert [(t.name, t.username, t.password) for t in targets] == [
        ("web-1.example.net:443", "ops", "pw"),
        ("db-1", None, None),
        ("lb", "ops", "pw"),
        ("web-2.example.net:8443", "ops", "pw"),
        ("web-3", "ops", "pw"),
        ("edge-1", "ops", "edge-secret"),
    ]
    assert targets[0].ca == str(tmp_path / "certs" / "ca.pem")
    web = load_inventory(str(EXAMPLE), ["web"], environ={"DDUMP_PASSWORD": "pw"})
    assert [t.name for t in web] == ["web-2.example.net:8443", "web-3"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            """
            targets:
              - host: web-1
                username: ops
                password: hunter2
            """,
            4,
            "a password cannot be written in the inventory: use password_env",
        ),
        (
            """
            defaults:
              password: hunter2
            targets: [web-1]
            """,
            2,
            "password_file",
        ),
        (
            """
            targets:
              - web-1
              - url: https://ops:hunter2@lb/capture
            """,
            3,
            "the URL holds a password: remove it and use password_env or password_file",
        ),
        (
            """
            targets:
              - host: web-1
                hots: web-2
            """,
            3,
            "unknown key 'hots' in a target (known: name, url, host, scheme, port,",
        ),
        ("defaults:\n  host: web-1\ntargets: [web-1]\n", 2, "unknown key 'host' in defaults"),
        ("targets: [web-1]\ngruops: {}\n", 2, "unknown key 'gruops' at the top level"),
        (
            "targets:\n  - host: web-1\n    port: '8475'\n",
            3,
            "port must be an integer, not a string '8475'",
        ),
        ("targets:\n  - host: web-1\n    port: yes\n", 3, "port must be an integer, not a boolean"),
        (
            "targets:\n  - host: web-1\n    username: 1234\n",
            3,
            "username must be a string or null, not an integer '1234' (quote it)",
        ),
        (
            "targets:\n  - host: web-1\n    filter: [icmp]\n",
            3,
            "filter must be a string or null, not a list",
        ),
        (
            "targets:\n  - web-1\n  - 42\n",
            3,
            "a target is a host name, a URL or a mapping, not an integer",
        ),
        ("targets: web-1\n", 1, "targets must be a list, not a string 'web-1'"),
        ("targets: [web-1]\ngroups:\n  web: web-2\n", 3, "group 'web' must be a list"),
        (
            "targets:\n  - web-1\n  - name: db\n    port: 5432\n",
            3,
            "a target needs 'host' or 'url'",
        ),
        ("targets:\n  - url: http://a\n    host: b\n", 3, "give 'url' or 'host', not both"),
        (
            "targets:\n  - url: http://a\n    port: 9\n",
            3,
            "'port' cannot go with 'url': put it in the URL",
        ),
        (
            "targets:\n  - url: http://a?filter=icmp\n    filter: udp\n",
            3,
            "filter is given twice: in the URL and here",
        ),
        ("targets:\n  - web-1\n  - url: web-2\n", 3, "did you mean http://web-2?"),
        ("targets:\n  - web-1\n  - url: http://ops:pw@a:99999\n", 3, "http://ops:***@a:99999"),
        ("targets:\n  - web 1\n", 2, "bad host 'web 1'"),
        ("targets:\n  - web-1:99999\n", 2, "port 99999 is out of range"),
        ("targets:\n  - {host: web-1,\n     port: 0}\n", 3, "port 0 is out of range"),
        ("targets:\n  - host: web-1\n    scheme: ftp\n", 3, "unsupported scheme 'ftp'"),
        ("targets:\n  - host: web-1\n    path: capture\n", 3, "path 'capture' must start with '/'"),
        (
            "targets:\n  - host: web-1\n    host: web-2\n",
            3,
            "duplicate key 'host' (first on line 2)",
        ),
        (
            "targets:\n  - {name: db, host: a}\n  - {name: db, host: b}\n",
            3,
            "name 'db' is already used on line 2",
        ),
        (
            "defaults:\n  username: ops\n  password_env: A\n  password_file: b\ntargets: [web-1]\n",
            4,
            "give password_env or password_file, not both",
        ),
        ("targets:\n  - host: web-1\n    password_env: PW\n", 3, "a password needs a username"),
        ("defaults:\n  cert: c.pem\ntargets: [web-1]\n", 2, "cert and key go together"),
        ("targets:\n  - host: web-1\n    key: k.pem\n", 3, "cert and key go together"),
        ("targets: []\ngroups: {web: []}\n", 1, "the inventory has no targets"),
        ("targets:\n  - web-1\n  - [web-2\n", 4, "expected ',' or ']'"),
        ("targets:\n  - web-1\n - web-2\n", 3, "expected <block end>"),
        ("- web-1\n", 1, "expected a mapping at the top level, not a list"),
    ],
)
def test_each_mistake_is_reported_with_its_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    reported = error_of(tmp_path, text)
    assert reported.startswith(f":{line}: "), reported
    assert message in reported
    assert "hunter2" not in reported


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, ":3: environment variable DDUMP_PASSWORD is not set"),
        ({"DDUMP_PASSWORD": ""}, ":3: the password from DDUMP_PASSWORD is empty"),
    ],
)
def test_a_default_password_from_a_missing_variable_points_at_the_defaults(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    text = "defaults:\n  username: ops\n  password_env: DDUMP_PASSWORD\ntargets:\n  - web-1\n"
    assert error_of(tmp_path, text, environ=environ) == message


def test_an_unreadable_or_empty_password_file_is_reported_at_its_line(tmp_path: Path) -> None:
    text = "targets:\n  - host: web-1\n    username: ops\n    password_file: {}\n"
    missing = error_of(tmp_path, text.format("nowhere.pass"))
    assert missing == (
        f":4: cannot read password_file {tmp_path / 'nowhere.pass'}: No such file or directory"
    )
    (tmp_path / "blank.pass").write_text("\nhunter2\n")
    assert error_of(tmp_path, text.format("blank.pass")) == (
        ":4: the password from blank.pass is empty"
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_inventory_is_an_error_at_line_1(tmp_path: Path, text: str) -> None:
    assert error_of(tmp_path, text) == ":1: the inventory is empty: add a 'targets:' list"


def test_an_unknown_group_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, FLEET)
    with pytest.raises(UsageError) as error:
        load_inventory(path, ["web", "dbs"], environ={})
    assert str(error.value) == f"{path}: unknown group 'dbs' (known groups: web, db)"
    path = write(tmp_path, "targets: [web-1]\n", "flat.yaml")
    with pytest.raises(UsageError, match="the inventory defines no groups"):
        load_inventory(path, ["web"], environ={})


def test_selecting_an_empty_group_is_an_error_at_the_group(tmp_path: Path) -> None:
    text = "targets: [web-1]\ngroups:\n  web:\n  db: [db-1]\n"
    assert error_of(tmp_path, text, "web") == ":3: group 'web' has no targets"


def test_a_missing_inventory_file_is_a_usage_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.yaml")
    with pytest.raises(UsageError) as error:
        load_inventory(path, environ={})
    assert str(error.value) == f"{path}: cannot read the inventory: No such file or directory"


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    text = "targets:\n  - !!python/object/apply:os.system [true]\n"
    assert error_of(tmp_path, text).startswith(":2: ")


# ---- --filter and -s on the command line ----


def test_command_line_filter_and_snaplen_fill_in_what_targets_do_not_give(tmp_path: Path) -> None:
    fleet = write(
        tmp_path,
        """
        targets:
          - host: 198.18.0.1
          - {host: 198.18.0.2, filter: "tcp port 5432"}
        """,
    )
    options = parse_args(
        [
            "-s",
            "200",
            "--filter",
            "udp",
            "-f",
            fleet,
            "http://198.18.0.3",
            "http://198.18.0.4/capture?snaplen=96&filter=icmp",
        ]
    )
    urls = [target.url for target in collect_targets(options)]
    assert urls == [
        "http://198.18.0.3:8475/capture?filter=udp&snaplen=200",
        "http://198.18.0.4:8475/capture?filter=icmp&snaplen=96",
        "http://198.18.0.1:8475/capture?filter=udp&snaplen=200",
        "http://198.18.0.2:8475/capture?filter=tcp%20port%205432&snaplen=200",
    ]
    assert [t.filter for t in collect_targets(options)] == ["udp", "icmp", "udp", "tcp port 5432"]


@pytest.mark.parametrize("value", ["0", "262145", "-5", "big"])
def test_bad_snaplen_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError, match="snaplen"):
        parse_args(["-s", value, "http://198.18.0.1"])


def test_snaplen_from_defaults_or_target_goes_to_the_worker(tmp_path: Path) -> None:
    targets = load(
        tmp_path,
        """
        defaults: {snaplen: 200}
        targets:
          - 198.18.0.1
          - {host: 198.18.0.2, snaplen: 96}
          - {host: 198.18.0.3, snaplen: null}
          - url: http://198.18.0.4/capture?snaplen=64
        """,
    )
    assert [t.url for t in targets] == [
        "http://198.18.0.1:8475/capture?snaplen=200",
        "http://198.18.0.2:8475/capture?snaplen=96",
        "http://198.18.0.3:8475/capture",
        "http://198.18.0.4:8475/capture?snaplen=64",
    ]


def test_batch_from_defaults_or_target_goes_to_the_worker(tmp_path: Path) -> None:
    targets = load(
        tmp_path,
        """
        defaults: {batch: true}
        targets:
          - 198.18.0.1
          - {host: 198.18.0.2, batch: false}
          - {host: 198.18.0.3, batch: null}
          - url: http://198.18.0.4/capture?batch=0
        """,
    )
    assert [t.url for t in targets] == [
        "http://198.18.0.1:8475/capture?batch=1",
        "http://198.18.0.2:8475/capture?batch=0",
        "http://198.18.0.3:8475/capture",
        "http://198.18.0.4:8475/capture?batch=0",
    ]


def test_command_line_batch_fills_in_what_targets_do_not_give(tmp_path: Path) -> None:
    fleet = write(tmp_path, "targets: [198.18.0.1, {host: 198.18.0.2, batch: false}]\n")
    options = parse_args(["--batch", "-f", fleet, "http://198.18.0.3?batch=0", "http://[::1]"])
    assert [target.url for target in collect_targets(options)] == [
        "http://198.18.0.3:8475/capture?batch=0",
        "http://[::1]:8475/capture?batch=1",
        "http://198.18.0.1:8475/capture?batch=1",
        "http://198.18.0.2:8475/capture?batch=0",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("targets: [{host: h, batch: 1}]", "batch must be true, false or null, not an integer '1'"),
        ("targets: [{host: h, batch: 'yes'}]", "batch must be true, false or null"),
        ("targets: [{url: 'http://h/capture?batch=1', batch: true}]", "batch is given twice"),
    ],
)
def test_bad_batch_is_reported_where_it_is(tmp_path: Path, text: str, message: str) -> None:
    assert message in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("targets: [{host: h, snaplen: 0}]", "snaplen must be 1..262144, not 0"),
        ("targets: [{host: h, snaplen: 300000}]", "snaplen must be 1..262144"),
        ("targets: [{host: h, snaplen: '200'}]", "snaplen must be an integer or null"),
        (
            "targets: [{url: 'http://h/capture?snaplen=9', snaplen: 10}]",
            "snaplen is given twice",
        ),
    ],
)
def test_bad_snaplen_is_reported_where_it_is(tmp_path: Path, text: str, message: str) -> None:
    assert message in error_of(tmp_path, text)
