"""Read Kubernetes-style YAML (multi-document files, directories, stdin), remembering where each came from."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import DocumentError, FieldError

_SUFFIXES = {".yaml", ".yml", ".json"}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one; kubectl refuses)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class Document:
    source: str
    index: int
    obj: dict


def _docs_from_text(text: str, source: str) -> Iterator[Document | DocumentError]:
    try:
        loaded = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        yield DocumentError(source, 0, "", "", "", [FieldError("", f"invalid YAML: {where}{getattr(e, 'problem', e)}")])
        return
    index = 0
    for obj in loaded:
        if obj is None:
            continue
        if isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
            for item in obj["items"]:
                yield _wrap(item, source, index)
                index += 1
            continue
        yield _wrap(obj, source, index)
        index += 1


def _wrap(obj: object, source: str, index: int) -> Document | DocumentError:
    if not isinstance(obj, dict):
        return DocumentError(source, index, "", "", "", [FieldError("", "document is not a mapping")])
    return Document(source, index, obj)


def load_paths(paths: list[str]) -> list[Document | DocumentError]:
    """Every document in the given files, directories (sorted, non-recursive like kubectl) or `-` (stdin)."""
    out: list[Document | DocumentError] = []
    for p in paths:
        if p == "-":
            out.extend(_docs_from_text(sys.stdin.read(), "-"))
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix in _SUFFIXES and f.is_file())
        else:
            files = [path]
        for f in files:
            try:
                text = f.read_text()
            except OSError as e:
                out.append(DocumentError(str(f), 0, "", "", "", [FieldError("", f"cannot read: {e.strerror}")]))
                continue
            out.extend(_docs_from_text(text, str(f)))
    return out


def load_text(text: str, source: str = "request") -> list[Document | DocumentError]:
    return list(_docs_from_text(text, source))
