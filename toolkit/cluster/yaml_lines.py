"""Load YAML into plain values while remembering the line of every value, so errors can name line and field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import BadInput
from ..inputs import MAX_DEPTH

Path_ = tuple[str | int, ...]
MAX_FILE_BYTES = 1 << 20


@dataclass
class Located:
    """Plain Python values plus {path: line} for every mapping key, sequence item and value (1-based lines)."""

    value: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    source: str = "<input>"

    def line(self, path: Path_) -> int | None:
        """The line of the value at path, or of its nearest located parent."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def error(self, path: Path_, problem: str, hint: str = "") -> BadInput:
        """A BadInput naming file, line and field: `fleet.yaml:12: nodes[1].gpus: must be ...`."""
        line = self.line(path)
        where = f"{self.source}:{line}" if line else self.source
        return BadInput(f"{where}: {field_name(path) or 'document'}: {problem}", hint)


def field_name(path: Path_) -> str:
    """nodes[1].gpus from ("nodes", 1, "gpus")."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load_located(text: str, source: str) -> Located:
    """Parse one YAML document with the safe constructor; duplicate keys, aliases and odd tags are errors."""
    if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
        raise BadInput(f"{source}: larger than {MAX_FILE_BYTES} bytes", "an inventory is a short YAML file")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f":{mark.line + 1}" if mark else ""
            raise BadInput(
                f"{source}{line}: not valid YAML ({exc.problem or exc.context})", "fix the YAML syntax"
            ) from None
        except yaml.YAMLError as exc:
            raise BadInput(f"{source}: not valid YAML ({exc})", "fix the YAML syntax") from None
        except RecursionError:
            raise BadInput(f"{source}: nests too deeply", "an inventory nests a few levels") from None
        located = Located(value=None, source=source)
        if node is None:
            return located
        located.value = _convert(loader, node, (), located, set())
        return located
    finally:
        loader.dispose()


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, located: Located, seen: set[int]) -> Any:
    """Node tree -> values; a node reached twice is an alias (refused: it could expand without bound)."""
    if id(node) in seen:
        raise located.error(path, "YAML aliases (*name) are not supported", "write the value out")
    if len(path) > MAX_DEPTH:
        raise located.error(path, f"nests deeper than {MAX_DEPTH} levels", "an inventory nests a few levels")
    seen.add(id(node))
    located.lines[path] = node.start_mark.line + 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in (
        "tag:yaml.org,2002:map",
        "tag:yaml.org,2002:seq",
    ):
        raise located.error(path, f"unsupported YAML type {node.tag!r}", "remove the tag")
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise BadInput(
                    f"{located.source}:{key_node.start_mark.line + 1}: {field_name(path) or 'document'}:"
                    " keys must be plain scalars (no merge keys)",
                    "write plain `key: value` lines",
                )
            key = _scalar(loader, key_node, path, located)
            if not isinstance(key, str):
                key = str(key)
            if key in result:
                raise BadInput(
                    f"{located.source}:{key_node.start_mark.line + 1}: "
                    f"{field_name(path + (key,))}: duplicate key",
                    "keep one of them",
                )
            result[key] = _convert(loader, value_node, path + (key,), located, seen)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(loader, item, path + (index,), located, seen) for index, item in enumerate(node.value)
        ]
    return _scalar(loader, node, path, located)


def _scalar(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, located: Located) -> Any:
    """A scalar through the safe constructor (int, float, bool, null, str; timestamps and binary are refused)."""
    if node.tag not in (
        "tag:yaml.org,2002:str",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
    ):
        raise located.error(
            path, f"unsupported YAML type {node.tag.rsplit(':', 1)[-1]!r}", "quote the value to make it text"
        )
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise located.error(path, f"cannot read the value ({exc})") from None
