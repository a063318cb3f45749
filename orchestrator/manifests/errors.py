"""User-input errors: one family, each naming the file, document, field and line.

Raised by the loader and the cross-document checks; the API turns them into a 422 with
the list, and the CLI prints one line per error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ManifestIssue:
    file: str
    document: int | None  # 0-based index of the document in its file
    field: str  # dotted path, e.g. "spec.placement.residency[1]"; "" for the whole document
    line: int | None  # 1-based
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.document is not None:
            where += f" (document {self.document})"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ManifestError(Exception):
    """One or more problems in user manifests; nothing was applied."""

    def __init__(self, issues: list[ManifestIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))
