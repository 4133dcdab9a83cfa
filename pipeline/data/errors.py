"""One error type for every problem with input data, so that a stage can report it in one line."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A problem with an input data set, located as precisely as possible.

    The message reads ``<file>: record <index/id>: field '<field>': <problem>`` with the parts that
    are known, so the person fixing the data knows exactly where to look.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | Path | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.source = str(source) if source is not None else None
        self.record = record
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.source is not None:
            parts.append(self.source)
        if self.record is not None:
            parts.append(f"record {self.record}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)
