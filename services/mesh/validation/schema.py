"""A small structural schema, the Python counterpart of a CRD's OpenAPI schema.

Each resource kind declares the exact shape of its fields; `check` walks a document against it and reports type
errors, unknown fields (typos are errors, as with a strict CRD schema), enum violations, required fields and
proto `oneof` groups, each with the full path from the object root (`spec.http[0].route[1].weight`). The
semantic rules (Istio's webhook, Kubernetes' validation) run only on documents whose structure is sound, as the
Kubernetes API server runs admission webhooks only after the schema check passed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..duration import DurationError, parse_duration
from ..errors import FieldError

INT32 = (-(2**31), 2**31 - 1)
UINT32 = (0, 2**32 - 1)
INT64 = (-(2**63), 2**63 - 1)
# The largest google.protobuf.Duration: 10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000


def child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def key(path: str, k: object) -> str:
    return f"{path}[{k}]"


class Schema:
    """Base of all field types. `check` appends FieldErrors for `value` found at `path`."""

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Opaque(Schema):
    """Opaque: a field Mizzen keeps but does not interpret (e.g. a Pod's volumes)."""

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        return None


@dataclass
class Str(Schema):
    enum: tuple[str, ...] | None = None
    max_len: int | None = None

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if not isinstance(value, str):
            errs.append(FieldError(path, f"must be a string, got {_kind_of(value)}"))
            return
        if self.enum is not None and value not in self.enum:
            errs.append(FieldError(path, unsupported(value, self.enum)))
        if self.max_len is not None and len(value) > self.max_len:
            errs.append(FieldError(path, f"Too long: may not be longer than {self.max_len}"))


@dataclass
class Int(Schema):
    lo: int = INT64[0]
    hi: int = INT64[1]

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            errs.append(FieldError(path, f"must be an integer, got {_kind_of(value)}"))
            return
        if not self.lo <= value <= self.hi:
            errs.append(FieldError(path, f"Invalid value: {value}: must be between {self.lo} and {self.hi}, inclusive"))


def Int32() -> Int:  # noqa: N802 - reads like a type name in schema tables
    return Int(*INT32)


def UInt32() -> Int:  # noqa: N802
    return Int(*UINT32)


@dataclass
class Num(Schema):
    lo: float | None = None
    hi: float | None = None

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errs.append(FieldError(path, f"must be a number, got {_kind_of(value)}"))
            return
        if self.lo is not None and value < self.lo:
            bound = f"must be greater than or equal to {self.lo:g}"
        elif self.hi is not None and value > self.hi:
            bound = f"must be less than or equal to {self.hi:g}"
        else:
            return
        errs.append(FieldError(path, f"Invalid value: {value:g}: {bound}"))


class Bool(Schema):
    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if not isinstance(value, bool):
            errs.append(FieldError(path, f"must be a boolean, got {_kind_of(value)}"))


class IntOrStr(Schema):
    """Kubernetes' IntOrString (a Service's targetPort)."""

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if isinstance(value, bool) or not isinstance(value, int | str):
            errs.append(FieldError(path, f"must be an integer or a string, got {_kind_of(value)}"))


@dataclass
class Duration(Schema):
    """A google.protobuf.Duration written in Go syntax (`1.5s`, `300ms`, `1h`).

    `strict` applies Istio's `ValidateDuration` (at least 1ms, whole milliseconds), which nearly every Istio
    duration field gets; a few (a cookie's ttl, tcp idleTimeout) accept any non-negative value.
    """

    strict: bool = True

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if not isinstance(value, str):
            errs.append(FieldError(path, f'must be a duration string like "1.5s" or "300ms", got {_kind_of(value)}'))
            return
        try:
            seconds = parse_duration(value)
        except DurationError:
            errs.append(FieldError(path, f'invalid duration {value!r}: use Go syntax like "1.5s", "300ms", "1h2m"'))
            return
        if abs(seconds) > _MAX_DURATION_SECONDS:
            errs.append(FieldError(path, f"duration {value!r} is out of range"))
            return
        msg = duration_error(seconds) if self.strict else ("duration must not be negative" if seconds < 0 else None)
        if msg:
            errs.append(FieldError(path, msg))


def duration_error(seconds: float) -> str | None:
    """Istio's `ValidateDuration`: ≥ 1ms and a whole number of milliseconds."""
    nanos = round(seconds * 1e9)
    if nanos < 1_000_000:
        return "duration must be greater than 1ms"
    if nanos % 1_000_000:
        return "only durations to ms precision are supported"
    return None


def duration_nanos(value: str) -> int:
    """Nanoseconds of a duration that already passed the schema check."""
    return round(parse_duration(value) * 1e9)


@dataclass
class List(Schema):
    item: Schema
    min_items: int = 0
    max_items: int | None = None

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if not isinstance(value, list):
            errs.append(FieldError(path, f"must be a list, got {_kind_of(value)}"))
            return
        if len(value) < self.min_items:
            errs.append(FieldError(path, f"must have at least {self.min_items} item{'s' if self.min_items > 1 else ''}"))
        if self.max_items is not None and len(value) > self.max_items:
            errs.append(FieldError(path, f"Too many: {len(value)}: must have at most {self.max_items} items"))
        for i, item in enumerate(value):
            if item is None:
                errs.append(FieldError(index(path, i), "must not be null"))
            else:
                self.item.check(item, index(path, i), errs)


@dataclass
class Map(Schema):
    """A map with string keys (`int_keys`: integer keys too, as YAML reads `8080:`)."""

    value: Schema
    int_keys: bool = False
    max_props: int | None = None

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if not isinstance(value, dict):
            errs.append(FieldError(path, f"must be a map, got {_kind_of(value)}"))
            return
        if self.max_props is not None and len(value) > self.max_props:
            errs.append(FieldError(path, f"Too many: {len(value)}: must have at most {self.max_props} entries"))
        for k, v in value.items():
            ok_key = isinstance(k, str) or (self.int_keys and isinstance(k, int) and not isinstance(k, bool))
            if not ok_key:
                errs.append(FieldError(key(path, k), f"map keys must be strings, got {_kind_of(k)} (quote the key)"))
                continue
            self.value.check(v, key(path, k), errs)


@dataclass
class Obj(Schema):
    """An object with a closed set of fields.

    `required`: field names that must be present, or name → message for Istio's own wording.
    `oneof`: groups of fields of which at most one may be set (a proto `oneof`).
    `open`: unknown fields are allowed (only for server-written parts such as a Pod's status).
    """

    fields: dict[str, Schema]
    required: Mapping[str, str] | Iterable[str] = ()
    oneof: tuple[tuple[str, ...], ...] = ()
    open: bool = False
    _required: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.required, Mapping):
            self._required = dict(self.required)
        else:
            self._required = {name: "Required value" for name in self.required}

    def check(self, value: object, path: str, errs: list[FieldError]) -> None:
        if not isinstance(value, dict):
            errs.append(FieldError(path, f"must be an object, got {_kind_of(value)}"))
            return
        for name, msg in self._required.items():
            if name not in value:
                errs.append(FieldError(child(path, name), msg))
        for group in self.oneof:
            present = [g for g in group if g in value]
            if len(present) > 1:
                errs.append(FieldError(path, f"only one of {', '.join(group)} may be set (found {', '.join(present)})"))
        for k, v in value.items():
            if not isinstance(k, str):
                errs.append(FieldError(key(path, k), f"field names must be strings, got {_kind_of(k)}"))
                continue
            sub = self.fields.get(k)
            if sub is None:
                if not self.open:
                    errs.append(FieldError(child(path, k), unknown_field(k, self.fields)))
                continue
            sub.check(v, child(path, k), errs)


def unknown_field(name: str, known: Iterable[str]) -> str:
    msg = f'unknown field "{name}"'
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        msg += f' (did you mean "{close[0]}"?)'
    return msg


def unsupported(value: object, allowed: Iterable[str]) -> str:
    listed = ", ".join(f'"{a}"' for a in allowed)
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return f"Unsupported value: {shown}: supported values: {listed}"


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def check(value: object, schema: Schema, path: str = "") -> list[FieldError]:
    errs: list[FieldError] = []
    schema.check(value, path, errs)
    return errs


def prune_nulls(value: object) -> object:
    """Drop null map entries, as the Kubernetes API server prunes nulls of non-nullable fields.

    `route:` written with nothing after it then means "no route" instead of a type error, and the stored dicts
    never carry None where a reader expects a list or a map. Nulls inside lists stay (they are errors).
    """
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value
