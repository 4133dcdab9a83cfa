"""Small helpers that read a field from a raw record or fail with one precise :class:`DataError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import DataError

_MISSING = object()


def _type_names(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


def get_field(
    record: Any,
    key: str,
    types: type | tuple[type, ...],
    *,
    origin: str,
    rid: int | str,
    path: str | None = None,
    default: Any = _MISSING,
) -> Any:
    """``record[key]`` checked against ``types``.

    A missing key (or ``None``) raises :class:`DataError` unless ``default`` is given; a value of the
    wrong type always raises. ``path`` is the field's location shown in the error (defaults to ``key``).
    """
    where = path or key
    if not isinstance(record, Mapping):
        raise DataError(f"expected an object, got {type(record).__name__}", source=origin, record=rid)
    value = record.get(key, None)
    if value is None:
        if default is not _MISSING:
            return default
        raise DataError("missing required field", source=origin, record=rid, field=where)
    # bool is an int subclass: never accept it where a number or string is expected
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DataError(f"expected {_type_names(types)}, got bool", source=origin, record=rid, field=where)
    if not isinstance(value, types):
        raise DataError(
            f"expected {_type_names(types)}, got {type(value).__name__}", source=origin, record=rid, field=where
        )
    return value


def str_list(value: Any, *, origin: str, rid: int | str, path: str) -> list[str]:
    """A list whose items are all strings (or numbers, converted), else a :class:`DataError`."""
    if not isinstance(value, list | tuple):
        raise DataError(f"expected a list, got {type(value).__name__}", source=origin, record=rid, field=path)
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise DataError(
                f"expected a string, got {type(item).__name__}", source=origin, record=rid, field=f"{path}[{i}]"
            )
        out.append(str(item))
    return out


def as_records(data: Any, *, origin: str, what: str = "a list of records") -> list[Any]:
    """Check that a parsed file holds a list (JSON array / JSONL / CSV / Parquet rows)."""
    if not isinstance(data, list):
        raise DataError(f"expected {what} at the top level, got {type(data).__name__}", source=origin)
    return data
