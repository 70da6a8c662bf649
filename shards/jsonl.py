"""Read JSON Lines files (annotations, predictions) with ``file:line:`` error messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards.errors import R2Error

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def json_type_name(value: Any) -> str:
    """How a message names the JSON type of a decoded value: ``a list``, ``null``, ``an object`` ..."""
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), "an object")


def read_json_objects(path: Path, error: type[R2Error]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a UTF-8 JSON Lines file, in file order.

    Line numbers start at 1 and count blank lines too; a byte-order mark is ignored. The file is
    read whole on the first ``next``; lines are decoded one by one as they are consumed.

    Raises:
        error: the file cannot be read (``file: ...``), is not UTF-8, or a line is not JSON, is
            nested too deeply for the parser, or is not a JSON object (``file:line: ...``).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the file: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text; save the file as UTF-8 JSON Lines") from exc
    for line, row in enumerate(text.split("\n"), start=1):
        if not row.strip():
            continue
        try:
            record = json.loads(row)
        except json.JSONDecodeError as exc:
            raise error(
                f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno}); "
                f"the file must hold one JSON object per line"
            ) from exc
        except RecursionError:
            raise error(
                f"{path}:{line}: JSON nested too deeply to read; the file must hold one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise error(
                f"{path}:{line}: expected a JSON object, got {json_type_name(record)}; "
                f"the file must hold one JSON object per line"
            )
        yield line, record
