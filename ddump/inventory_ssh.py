"""Inventory targets with `scheme: ssh` (or an `ssh://` url): ddump/inventory.py's reader does
the YAML and the errors (file:LINE), this module what an SSH target takes from its settings.

The worker's keys (path, username, password_*, ca, cert, key) do not apply to an SSH target; the
defaults' port applies to it only when the defaults themselves say `scheme: ssh`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ddump.protocol import BATCH_PARAM
from ddump.ssh_targets import SSH_SCHEME, SshTarget, check_ssh_filter, is_ssh_url, parse_ssh_target
from ddump.targets import Endpoint, validate_host, validate_port

if TYPE_CHECKING:
    import yaml

    from ddump.inventory import _Inventory
    from ddump.inventory_yaml import Settings

_WORKER_ONLY = ("path", "username", "password_env", "password_file", "ca", "cert", "key")
_NOT_WITH_URL = ("host", "port", "scheme", "user", "filter", "snaplen", BATCH_PARAM)


def is_ssh(own: Settings, defaults: Settings) -> bool:
    """Whether a target's settings (over the defaults) make it an SSH target."""
    if "url" in own:
        return is_ssh_url(str(own["url"].value))
    scheme = own.get("scheme") or defaults.get("scheme")
    return scheme is not None and str(scheme.value).lower() == SSH_SCHEME


def ssh_target(
    reader: _Inventory, own: Settings, defaults: Settings, typed: Settings
) -> tuple[SshTarget, yaml.Node | None]:
    """The SshTarget of one inventory entry, and its name's node (for duplicate names)."""
    for key in _WORKER_ONLY:
        if key in own:
            raise reader.error(own[key].node, f"{key} is not for ssh targets")
    shared = defaults if is_ssh({}, defaults) else {}
    merged = {**defaults, **typed, **own}  # typed: the command line's, over the defaults
    if "url" in own:
        for key in _NOT_WITH_URL:
            if key in own:
                raise reader.error(
                    own[key].node, f"{key!r} cannot go with 'url': put it in the URL"
                )
        target = reader.check(own["url"].node, parse_ssh_target, str(own["url"].value))
    else:
        host = reader.checked(own, "host", validate_host, "")
        port = reader.checked({**shared, **own}, "port", validate_port, None)
        target = SshTarget(name=host if port is None else f"{host}:{port}", host=host, port=port)
    filter_, snaplen = merged.get("filter"), merged.get("snaplen")
    reader.with_snaplen(Endpoint("ssh", target.host), snaplen)  # the worker's range check
    user, sudo, batch = merged.get("user"), merged.get("sudo"), merged.get(BATCH_PARAM)
    options = merged.get("ssh_options")
    name = own.get("name")
    if name is not None and not str(name.value).strip():
        raise reader.error(name.node, "name is empty")
    if target.filter is None and filter_ is not None and filter_.value is not None:
        target = replace(
            target, filter=reader.check(filter_.node, check_ssh_filter, str(filter_.value))
        )
    if target.snaplen is None and snaplen is not None and isinstance(snaplen.value, int):
        target = replace(target, snaplen=snaplen.value)
    target = replace(
        target,
        name=str(name.value) if name else target.name,
        user=target.user or (str(user.value) if user and user.value is not None else None),
        batch=target.batch or bool(batch and batch.value),
        sudo=target.sudo or bool(sudo and sudo.value),
        ssh_options=tuple(options.value) if options else (),  # type: ignore[arg-type]
    )
    return target, name.node if name else None
