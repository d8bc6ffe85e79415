"""Reading an inventory's YAML: nodes, not dicts, so that every value keeps its line.

A YamlReader gives a mapping's entries (merge keys applied, duplicates refused), a list, a
scalar's value and a description of any node for messages, and makes every error a
UsageError "file:LINE: message". What the keys mean is ddump/inventory.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from ddump.errors import UsageError

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

A = TypeVar("A")
R = TypeVar("R")


@dataclass(frozen=True)
class Setting:
    """A value from the inventory and the node it came from (its line, for errors)."""

    value: object
    node: yaml.Node


Settings = dict[str, Setting]


class YamlReader:
    """Reads one inventory file's nodes; its errors name the file and the node's line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.constructor = yaml.constructor.SafeConstructor()
        self.entries_seen: dict[int, list[tuple[str, yaml.Node, yaml.Node]]] = {}

    def error(self, node: yaml.Node, message: str) -> UsageError:
        return UsageError(f"{self.path}:{node.start_mark.line + 1}: {message}")

    def yaml_error(self, error: yaml.MarkedYAMLError) -> UsageError:
        mark = error.problem_mark or error.context_mark
        where = f":{mark.line + 1}" if mark is not None else ""
        message = error.problem or "not valid YAML"
        if error.context:
            message = f"{error.context}: {message}"
        return UsageError(f"{self.path}{where}: {message}")

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"{what} must be a list, not {self.describe(node)}")
        return list(node.value)

    def entries(self, node: yaml.Node, where: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping, with merge keys ("<<: *anchor") applied."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"expected a mapping {where}, not {self.describe(node)}")
        if id(node) in self.entries_seen:  # flatten_mapping changes the node: only once
            return self.entries_seen[id(node)]
        lines: dict[str, int] = {}
        for key, _ in node.value:
            if key.tag == _MERGE_TAG:
                continue
            if not isinstance(key, yaml.ScalarNode) or not isinstance(self.value(key), str):
                raise self.error(key, f"a key must be a string, not {self.describe(key)}")
            first = lines.setdefault(key.value, key.start_mark.line + 1)
            if first != key.start_mark.line + 1:
                raise self.error(key, f"duplicate key {key.value!r} (first on line {first})")
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as error:
            raise self.yaml_error(error) from None
        # Merged entries come first, the mapping's own last: a later key overrides.
        merged = {key.value: (key.value, key, value) for key, value in node.value}
        self.entries_seen[id(node)] = list(merged.values())
        return self.entries_seen[id(node)]

    def value(self, node: yaml.Node) -> object:
        if not isinstance(node, yaml.ScalarNode):
            return node
        try:
            return self.constructor.construct_object(node)
        except yaml.MarkedYAMLError as error:
            raise self.yaml_error(error) from None

    def describe(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        value = self.value(node)
        if value is None:
            return "null"
        kinds = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}
        return f"{kinds.get(type(value), type(value).__name__)} {node.value!r}"

    def check(self, node: yaml.Node, check: Callable[[A], R], value: A) -> R:
        try:
            return check(value)
        except UsageError as error:
            raise self.error(node, str(error)) from None

    def checked(self, settings: Settings, name: str, check: Callable[[Any], R], default: R) -> R:
        """The setting, already type-checked by settings(), validated; or the default."""
        setting = settings.get(name)
        return default if setting is None else self.check(setting.node, check, setting.value)


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG
