"""The YAML inventory: a fleet of targets, in named groups, with shared defaults.

The schema is documented in configs/fleet.yaml. Every error is a UsageError "file:line: message":
the file is composed into nodes (not constructed into dicts) so that each value keeps its line.
I/O: the inventory itself, password files and the environment; nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import yaml

from ddump.errors import UsageError
from ddump.inventory_ssh import is_ssh, ssh_target
from ddump.inventory_yaml import Setting, Settings, YamlReader, is_null
from ddump.pcap import DEFAULT_SNAPLEN
from ddump.protocol import BATCH_PARAM, DEFAULT_PORT
from ddump.ssh_targets import SshTarget, check_ssh_option
from ddump.targets import (
    DEFAULT_PATH,
    Endpoint,
    Target,
    make_target,
    split_host_port,
    split_url,
    validate_host,
    validate_path,
    validate_port,
    validate_scheme,
)

_STR, _INT, _OPTIONAL_STR = "a string", "an integer", "a string or null"
_OPTIONAL_INT = "an integer or null"
_OPTIONAL_BOOL = "true, false or null"
_STR_LIST = "a list of strings"
# null is allowed where it means "none" (no filter, no password, ...), to undo a default.
_DEFAULT_KEYS = {
    "scheme": _STR,
    "port": _INT,
    "path": _STR,
    "filter": _OPTIONAL_STR,
    "snaplen": _OPTIONAL_INT,
    "batch": _OPTIONAL_BOOL,
    "username": _OPTIONAL_STR,
    "password_env": _OPTIONAL_STR,
    "password_file": _OPTIONAL_STR,
    "ca": _OPTIONAL_STR,
    "cert": _OPTIONAL_STR,
    "key": _OPTIONAL_STR,
    # scheme: ssh only (ddump/ssh_targets.py)
    "user": _OPTIONAL_STR,
    "sudo": _OPTIONAL_BOOL,
    "ssh_options": _STR_LIST,
}
_SSH_ONLY = ("user", "sudo", "ssh_options")
_TARGET_KEYS = {"name": _STR, "url": _STR, "host": _STR, **_DEFAULT_KEYS}
_NODE = ""  # kept as a node, checked by its reader
_TOP_KEYS = {"defaults": _NODE, "targets": _NODE, "groups": _NODE}
_PASSWORD_KEYS = ("password_env", "password_file")


def load_inventory(
    path: str,
    groups: Sequence[str] = (),
    *,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] | None = None,
) -> list[Target | SshTarget]:
    """Read an inventory; return all its targets, or only those of `groups` when given.

    `overrides` ("filter", "snaplen", "batch": what the command line says) win over the
    inventory's defaults, and lose to a target's own keys (or its URL's parameters).
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise UsageError(f"{path}: cannot read the inventory: {error.strerror}") from None
    return _Inventory(path, environ, overrides or {}).load(data, groups)


class _Inventory(YamlReader):
    def __init__(
        self, path: str, environ: Mapping[str, str], overrides: Mapping[str, object]
    ) -> None:
        super().__init__(path)
        self.directory = os.path.dirname(os.path.abspath(path))
        self.environ = environ
        self.overrides = overrides

    def load(self, data: bytes, selected: Sequence[str]) -> list[Target | SshTarget]:
        try:
            root = yaml.compose(data, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as error:
            raise self.yaml_error(error) from None
        except yaml.YAMLError as error:
            raise UsageError(f"{self.path}: {error}") from None
        if root is None or is_null(root):
            raise UsageError(f"{self.path}:1: the inventory is empty: add a 'targets:' list")
        top = self.settings(root, _TOP_KEYS, "at the top level")
        defaults: Settings = {}
        if "defaults" in top:
            defaults = self.settings(top["defaults"].node, _DEFAULT_KEYS, "in defaults")
        ungrouped = self.sequence(top["targets"].node, "targets") if "targets" in top else []
        groups = self.groups(top["groups"].node) if "groups" in top else {}
        every = _unique([*ungrouped, *(node for _, nodes in groups.values() for node in nodes)])
        if not every:
            raise self.error(root, "the inventory has no targets: add a 'targets:' list")
        chosen = _unique(self.select(groups, selected)) if selected else every
        chosen_ids = {id(node) for node in chosen}
        # Every target is checked, chosen or not; only the chosen ones read their password.
        built: dict[int, Target | SshTarget] = {}
        names: dict[str, yaml.Node] = {}
        for node in every:
            target, name_node = self.target(node, defaults, id(node) in chosen_ids)
            if name_node is not None:
                first = names.setdefault(target.name, name_node)
                if first is not name_node:
                    line = first.start_mark.line + 1
                    raise self.error(
                        name_node, f"name {target.name!r} is already used on line {line}"
                    )
            built[id(node)] = target
        return [built[id(node)] for node in chosen]

    def groups(self, node: yaml.Node) -> dict[str, tuple[yaml.Node, list[yaml.Node]]]:
        if is_null(node):
            return {}
        return {
            name: (key, self.sequence(value, f"group {name!r}"))
            for name, key, value in self.entries(node, "groups")
        }

    def select(
        self, groups: Mapping[str, tuple[yaml.Node, list[yaml.Node]]], selected: Sequence[str]
    ) -> list[yaml.Node]:
        nodes: list[yaml.Node] = []
        for name in selected:
            if name not in groups:
                known = ", ".join(groups) if groups else "none: the inventory defines no groups"
                raise UsageError(f"{self.path}: unknown group {name!r} (known groups: {known})")
            key, members = groups[name]
            if not members:
                raise self.error(key, f"group {name!r} has no targets")
            nodes += members
        return nodes

    def settings(self, node: yaml.Node, kinds: Mapping[str, str], where: str) -> Settings:
        settings: Settings = {}
        for name, key, value_node in self.entries(node, where):
            if name == "password":
                raise self.error(
                    key,
                    "a password cannot be written in the inventory: use password_env"
                    " (an environment variable) or password_file (a file readable only by you)",
                )
            if name not in kinds:
                raise self.error(key, f"unknown key {name!r} {where} (known: {', '.join(kinds)})")
            kind = kinds[name]
            if kind == _STR_LIST:
                settings[name] = Setting(self.ssh_options(value_node, name), value_node)
                continue
            value = value_node if kind == _NODE else self.value(value_node)
            if kind != _NODE and not _has_kind(value, kind):
                hint = (
                    " (quote it)"
                    if kind in (_STR, _OPTIONAL_STR) and isinstance(value_node, yaml.ScalarNode)
                    else ""
                )
                raise self.error(
                    value_node, f"{name} must be {kind}, not {self.describe(value_node)}{hint}"
                )
            settings[name] = Setting(value, value_node)
        return settings

    def ssh_options(self, node: yaml.Node, name: str) -> tuple[str, ...]:
        """A list of ssh `-o` values, each checked on its own line."""
        options = []
        for item in self.sequence(node, name):
            value = self.value(item)
            if not isinstance(value, str):
                raise self.error(
                    item, f"{name} holds strings (Key=Value), not {self.describe(item)}"
                )
            options.append(self.check(item, check_ssh_option, value))
        return tuple(options)

    def target(
        self, node: yaml.Node, defaults: Settings, read_password: bool
    ) -> tuple[Target | SshTarget, yaml.Node | None]:
        if isinstance(node, yaml.MappingNode):
            own = self.settings(node, _TARGET_KEYS, "in a target")
        elif isinstance(node, yaml.ScalarNode) and isinstance(self.value(node), str):
            own = self.plain_target(node)
        else:
            raise self.error(
                node, f"a target is a host name, a URL or a mapping, not {self.describe(node)}"
            )
        if "url" in own and "host" in own:
            raise self.error(own["host"].node, "give 'url' or 'host', not both")
        # What the user typed now beats what the inventory says for every target.
        typed = {name: Setting(value, node) for name, value in self.overrides.items()}
        if is_ssh(own, defaults):
            return ssh_target(self, own, defaults, typed)
        for only in _SSH_ONLY:
            if only in own:
                raise self.error(own[only].node, f"{only} is for ssh targets (scheme: ssh)")
        if "url" in own:
            endpoint = self.url_endpoint(own)
        elif "host" in own:
            endpoint = self.host_endpoint(own, defaults)
        else:
            raise self.error(node, "a target needs 'host' or 'url'")
        merged = {**defaults, **typed, **own}
        endpoint = self.with_snaplen(endpoint, merged.get("snaplen"))
        endpoint = with_param(endpoint, BATCH_PARAM, _flag_text(merged.get(BATCH_PARAM)))
        username = endpoint.username
        if username is None and "username" in merged:
            username = _str_or_none(merged["username"].value)
        password = self.password(own, defaults, username, read_password)
        ca, cert, key = (self.file(merged.get(name)) for name in ("ca", "cert", "key"))
        if (cert is None) != (key is None):
            present = merged["cert"] if cert is not None else merged["key"]
            raise self.error(present.node, "cert and key go together: give both or neither")
        name = own.get("name")
        if name is not None and not str(name.value).strip():
            raise self.error(name.node, "name is empty")
        target = make_target(
            replace(endpoint, username=username, password=password),
            name=_str_or_none(name.value) if name else None,
            default_filter=_str_or_none(merged["filter"].value) if "filter" in merged else None,
            ca=ca,
            cert=cert,
            key=key,
        )
        return target, name.node if name else None

    def with_snaplen(self, endpoint: Endpoint, snaplen: Setting | None) -> Endpoint:
        """The worker's ?snaplen= from the inventory, unless the target's URL gives one."""
        if snaplen is None or snaplen.value is None:
            return endpoint
        value = snaplen.value
        assert isinstance(value, int)
        if not 1 <= value <= DEFAULT_SNAPLEN:
            raise self.error(snaplen.node, f"snaplen must be 1..{DEFAULT_SNAPLEN}, not {value}")
        return with_param(endpoint, "snaplen", str(value))

    def plain_target(self, node: yaml.ScalarNode) -> Settings:
        """ "web-1", "web-1:9000", "198.18.0.3", "::1", "[::1]:9000", or a whole URL."""
        text = str(self.value(node)).strip()
        if "://" in text:
            return {"url": Setting(text, node)}
        if text.count(":") > 1 and not text.startswith("["):
            return {"host": Setting(text, node)}
        host, port = self.check(node, split_host_port, text)
        settings = {"host": Setting(host, node)}
        if port is not None:
            settings["port"] = Setting(port, node)
        return settings

    def url_endpoint(self, own: Settings) -> Endpoint:
        url = own["url"]
        for name in ("host", "port", "scheme", "path"):
            if name in own:
                raise self.error(
                    own[name].node, f"{name!r} cannot go with 'url': put it in the URL"
                )
        endpoint = self.check(url.node, split_url, str(url.value))
        if endpoint.password is not None:
            raise self.error(
                url.node,
                "the URL holds a password: remove it and use password_env or password_file",
            )
        params = dict(endpoint.params)
        for name, in_url in (
            ("filter", endpoint.filter),
            ("username", endpoint.username),
            ("snaplen", params.get("snaplen")),
            (BATCH_PARAM, params.get(BATCH_PARAM)),
        ):
            if in_url is not None and name in own:
                raise self.error(own[name].node, f"{name} is given twice: in the URL and here")
        return endpoint

    def host_endpoint(self, own: Settings, defaults: Settings) -> Endpoint:
        merged = {**defaults, **own}
        return Endpoint(
            scheme=self.checked(merged, "scheme", validate_scheme, "http"),
            host=self.checked(own, "host", _host_without_port, ""),
            port=self.checked(merged, "port", validate_port, DEFAULT_PORT),
            path=self.checked(merged, "path", validate_path, DEFAULT_PATH),
        )

    def password(
        self, own: Settings, defaults: Settings, username: str | None, read: bool
    ) -> str | None:
        # The target's password_env/password_file replaces the default's, whichever it is.
        source = own if any(name in own for name in _PASSWORD_KEYS) else defaults
        if all(name in source for name in _PASSWORD_KEYS):
            raise self.error(
                source["password_file"].node, "give password_env or password_file, not both"
            )
        setting = source.get("password_env") or source.get("password_file")
        if setting is None or setting.value is None:
            return None
        if username is None:
            raise self.error(setting.node, "a password needs a username: add 'username:'")
        if not read:
            return None
        if "password_env" in source:
            secret = self.environ.get(str(setting.value))
            if secret is None:
                raise self.error(setting.node, f"environment variable {setting.value} is not set")
        else:
            path = self.file(setting)
            try:
                with open(str(path), encoding="utf-8") as file:
                    secret = file.readline().strip()
            except (OSError, UnicodeError) as error:
                reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
                raise self.error(
                    setting.node, f"cannot read password_file {path}: {reason}"
                ) from None
        if not secret:
            raise self.error(setting.node, f"the password from {setting.value} is empty")
        return secret

    def file(self, setting: Setting | None) -> str | None:
        """A path from the inventory: relative ones are relative to the inventory's directory."""
        if setting is None or setting.value is None:
            return None
        return os.path.join(self.directory, os.path.expanduser(str(setting.value)))


def _host_without_port(text: str) -> str:
    """A `host:` value: a name or an address (IPv6 bare or in brackets), never with a port."""
    if text.count(":") == 1 or text.startswith("["):
        host, port = split_host_port(text)
        if port is not None:
            raise UsageError(f"host {text!r} holds a port: write it as 'port: {port}'")
        return host
    return validate_host(text)


def _has_kind(value: object, kind: str) -> bool:
    if kind == _OPTIONAL_BOOL:
        return value is None or isinstance(value, bool)
    if kind in (_INT, _OPTIONAL_INT):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return is_int or (kind == _OPTIONAL_INT and value is None)
    return isinstance(value, str) or (kind == _OPTIONAL_STR and value is None)


def with_param(endpoint: Endpoint, name: str, value: str | None) -> Endpoint:
    """The worker's ?name=value from the inventory, unless the target's URL gives one."""
    if value is None or any(given == name for given, _ in endpoint.params):
        return endpoint
    return replace(endpoint, params=(*endpoint.params, (name, value)))


def _flag_text(setting: Setting | None) -> str | None:
    if setting is None or setting.value is None:
        return None
    return "1" if setting.value else "0"


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _unique(nodes: Iterable[yaml.Node]) -> list[yaml.Node]:
    """Drop repeats of one node (a YAML alias listed twice), keeping the first."""
    seen: dict[int, yaml.Node] = {}
    for node in nodes:
        seen.setdefault(id(node), node)
    return list(seen.values())
