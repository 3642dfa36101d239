"""Errors that name where bad input came from: file, document, resource and field."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldError:
    path: str  # e.g. "spec.http[0].route[1].weight"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class DocumentError:
    source: str  # file name, "-" for stdin, or "request"
    index: int  # 0-based document index within the source
    kind: str
    namespace: str
    name: str
    errors: list[FieldError] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"{self.source}, document {self.index}"
        what = f"{self.kind or '?'} {self.namespace + '/' if self.namespace else ''}{self.name or '?'}"
        return "\n".join(f"{where}: {what}: {e}" for e in self.errors)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "document": self.index,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "errors": [_field_json(e) for e in self.errors],
        }


def _field_json(e: FieldError) -> dict:
    out = {"field": e.path, "message": e.message}
    if code := getattr(e, "code", ""):  # an analysis finding (validation/analysis.py) names its message type
        out["code"] = code
    return out


class ApplyError(Exception):
    """Raised when any document of an apply is invalid; nothing of the apply is stored."""

    def __init__(self, documents: list[DocumentError]):
        self.documents = documents
        super().__init__("\n".join(str(d) for d in documents))

    def to_json(self) -> dict:
        return {"kind": "Status", "status": "Failure", "reason": "Invalid", "message": str(self),
                "details": [d.to_json() for d in self.documents]}
