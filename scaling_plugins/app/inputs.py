"""Reading the command's input files (configs, saved runs) with errors that name the file, the line and the fault.

Every failure is an :class:`InputError` (a ``ValueError``) whose text is ``FILE: line L, column C: what is wrong``,
so ``check-config`` and ``report`` print it as it is:

    read_text("config.json")     # UTF-8 text; not UTF-8 → "config.json: line 3, column 14: not UTF-8 text ..."
    parse_json("config.json")    # one JSON document
    parse_jsonl("metrics.jsonl") # one JSON object per non-blank line, each error at its line in the file
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

PathLike = Union[str, Path]


class InputError(ValueError):
    """A file the command cannot use: where (file, and line and column when known) and why."""

    def __init__(self, path: PathLike, message: str, line: Optional[int] = None, column: Optional[int] = None):
        self.path, self.message, self.line, self.column = Path(path), message, line, column
        super().__init__(": ".join(part for part in (str(self.path), self.position, message) if part))

    @property
    def position(self) -> str:
        """``line L, column C``, ``line L``, or "" when the fault is the whole file."""
        if self.line is None:
            return ""
        return f"line {self.line}" + ("" if self.column is None else f", column {self.column}")


def file_in_the_way(folder: PathLike) -> Optional[Path]:
    """The first of ``folder`` and its parents that exists as something other than a folder (so that
    ``folder`` cannot be created), if any."""
    folder = Path(folder)
    return next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)


def make_folder(folder: PathLike, contents: str) -> Path:
    """Create ``folder`` (and its parents) unless it exists; ``ValueError`` "cannot write CONTENTS into FOLDER:
    why" when it cannot be."""
    folder = Path(folder)
    blocker = file_in_the_way(folder)
    if blocker is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError as err:
            reason = err.strerror or str(err)
    else:
        reason = f"{blocker} is a file, not a folder"
    raise ValueError(f"cannot write {contents} into {folder}: {reason}")


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of byte ``offset`` in ``data``; the column counts bytes."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def read_text(path: PathLike) -> str:
    """The file's text, decoded as UTF-8 (the encoding JSON requires)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = _position(data, err.start)
        raise InputError(path, f"not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8",
                         line, column) from None


def _loads(text: str, path: PathLike, line_offset: int = 0) -> Any:
    """``json.loads(text)``; a syntax error becomes an ``InputError`` at its line (shifted by ``line_offset``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON: {err.msg}", err.lineno + line_offset, err.colno) from None


def parse_json(path: PathLike) -> Any:
    """The one JSON document in ``path``."""
    return _loads(read_text(path), path)


def parse_jsonl(path: PathLike, check: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file: one JSON object per non-blank line (a missing file has none). ``check``
    may reject a record with a ``ValueError``, which becomes an ``InputError`` at that record's line."""
    if not Path(path).exists():
        return []
    records = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):   # JSON strings may hold U+2028
        if not line.strip():
            continue
        record = _loads(line, path, line_offset=number - 1)
        if not isinstance(record, dict):
            raise InputError(path, f"expected a JSON object per line, got {type(record).__name__}", number)
        try:
            if check is not None:
                check(record)
        except ValueError as err:
            raise InputError(path, str(err), number) from None
        records.append(record)
    return records
