"""Exceptions a user can cause. Each message names the file, the row or field, and the fix.

`assert` is for internal invariants only; everything a user's input can trigger raises one of these.
"""
from __future__ import annotations


class QovaryxDataError(Exception):
    """Base class: catch this to handle every user-facing data error."""


class SourceError(QovaryxDataError):
    """A problem with one input file or one row of it.

    `reason` is a short stable code (e.g. ``"malformed_json"``) used for skip counts;
    `path` and `row` locate it (row is a 1-based line number for line formats, a 0-based row index
    for tabular ones, or None when the whole file is at fault).
    """

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None,
                 reason: str = "invalid"):
        super().__init__(message)
        self.path = path
        self.row = row
        self.reason = reason


class TokenizerError(QovaryxDataError):
    """Tokenizer training or loading failed because of its inputs or options."""


class ManifestError(QovaryxDataError):
    """A pack manifest (YAML) is invalid: unknown key, wrong type, missing key."""


class FormatError(QovaryxDataError):
    """A packed file has the wrong magic, version, dtype or size, or dataset.json is missing."""


class IntegrityError(QovaryxDataError):
    """A packed file's checksum does not match dataset.json."""


class ImageError(SourceError):
    """An image in a source row is missing, corrupt, too large or outside the source's folder."""
