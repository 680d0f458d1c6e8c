"""The warehouse's own error and how a DuckDB message is shown in one line (imported by the schema and
the file operations alike, so neither imports the other for them)."""

from __future__ import annotations

import re


class WarehouseError(RuntimeError):
    """A warehouse file that cannot be used as it is: the message names the file and the problem."""


def one_line(exc: BaseException) -> str:
    """DuckDB's message without the query excerpt: its first paragraph, on one line."""
    first = re.split(r"\n\s*\n", str(exc).strip(), maxsplit=1)[0]
    return " ".join(first.split())
