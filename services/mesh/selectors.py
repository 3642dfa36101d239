"""Kubernetes label and field selectors (`?labelSelector=app=web,tier!=db`, `?fieldSelector=metadata.name=x`).

Label selectors follow `k8s.io/apimachinery/pkg/labels`: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`,
`k` (exists) and `!k` (does not exist), joined by commas (all must hold). Field selectors support what every
resource supports on the API server: `metadata.name` and `metadata.namespace` with `=`, `==` and `!=`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Predicate = Callable[[dict], bool]


class SelectorError(ValueError):
    """A selector the API server would refuse (400 BadRequest)."""


def _split_terms(text: str) -> list[str]:
    """Split on the commas that are not inside `( )`."""
    terms, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur or terms:
        terms.append("".join(cur).strip())
    return [t for t in terms if t]


_SET_TERM = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")
_EQ_TERM = re.compile(r"^([^!=\s]+)\s*(==|!=|=)\s*(\S*)$")
_KEY = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class _Term:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict) -> bool:
        have = labels.get(self.key)
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return have is not None and have in self.values
        return have is None or have not in self.values  # != and notin match objects without the label


def parse_label_selector(text: str | None) -> Predicate:
    """A predicate on an object's metadata.labels; raises SelectorError on bad syntax."""
    if not text:
        return lambda _o: True
    terms: list[_Term] = []
    for raw in _split_terms(text):
        if m := _SET_TERM.match(raw):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            terms.append(_Term(m.group(1), m.group(2), values))
        elif m := _EQ_TERM.match(raw):
            op = "=" if m.group(2) == "==" else m.group(2)
            terms.append(_Term(m.group(1), op, (m.group(3),)))
        elif raw.startswith("!") and _KEY.match(raw[1:].strip()):
            terms.append(_Term(raw[1:].strip(), "!exists"))
        elif _KEY.match(raw):
            terms.append(_Term(raw, "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {raw!r}")
    for t in terms:
        if not _KEY.match(t.key):
            raise SelectorError(f"invalid label key {t.key!r}")

    def match(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(t.matches(labels) for t in terms)

    return match


FIELDS = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str | None) -> Predicate:
    if not text:
        return lambda _o: True
    terms: list[tuple[str, bool, str]] = []
    for raw in _split_terms(text):
        m = _EQ_TERM.match(raw)
        if not m:
            raise SelectorError(f"invalid selector: {raw!r}; can't understand {raw!r}")
        field, op, value = m.groups()
        if field not in FIELDS:
            raise SelectorError(f'field label not supported: {field} (supported: {", ".join(FIELDS)})')
        terms.append((field.split(".", 1)[1], op != "!=", value))

    def match(obj: dict) -> bool:
        meta = obj.get("metadata") or {}
        return all((meta.get(f) or "") == v if eq else (meta.get(f) or "") != v for f, eq, v in terms)

    return match
