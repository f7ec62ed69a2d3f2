"""Reading the command's input files (configs, saved runs) with errors that name the file, the line and the fault.

Every failure is an :class:`InputError` (a ``ValueError``) whose text is ``FILE: line L, column C: what is wrong``,
so ``check-config`` and ``report`` print it as it is:

    read_text("config.json")     # UTF-8 text; not UTF-8 → "config.json: line 3, column 14: not UTF-8 text ..."
    parse_json("config.json")    # one JSON document
    parse_jsonl("metrics.jsonl") # one JSON object per non-blank line, each error at its line in the file
    parse_config("ds.json")      # a policy entry as JSON, a DeepSpeed config as DeepSpeed reads it (Hjson)
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass
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


class _Pairs(list):
    """A JSON object's (key, value) pairs in file order, a key given twice kept twice."""


@dataclass(frozen=True)
class ParsedConfig:
    """A config file's document, and whether it is Hjson rather than JSON (comments, trailing commas, quoteless
    strings), which DeepSpeed reads and ``json.load`` does not."""

    document: Any
    hjson: bool = False


def is_deepspeed_config(document: Any) -> bool:
    """Whether a parsed config is read as a DeepSpeed config (a mapping with a ``"scheduler"`` entry or without a
    policy entry's ``"type"``) rather than as a standalone policy entry ``{"type": NAME, "params": {...}}``."""
    return isinstance(document, Mapping) and ("scheduler" in document or "type" not in document)


def _objects(value: Any, path: str, duplicates: list[str]) -> Any:
    """``value`` with every ``_Pairs`` made a dict; the key path of each key given twice goes to ``duplicates``."""
    if isinstance(value, _Pairs):
        result: dict[str, Any] = {}
        for key, item in value:
            where = f"{path}.{key}" if path else str(key)
            if key in result and where not in duplicates:
                duplicates.append(where)
            result[key] = _objects(item, where, duplicates)
        return result
    if isinstance(value, list):
        return [_objects(item, f"{path}[{index}]", duplicates) for index, item in enumerate(value)]
    return value


def _hjson_pairs(text: str, path: PathLike) -> Any:
    """The document as DeepSpeed reads a config file (``hjson.load``); a syntax error becomes an ``InputError`` at
    its line. ``ImportError`` when hjson (a DeepSpeed dependency) is not installed."""
    import hjson   # DeepSpeed's dependency: installed with scaling_plugins[deepspeed]

    try:
        return hjson.loads(text, object_pairs_hook=_Pairs)
    except hjson.HjsonDecodeError as err:
        raise InputError(path, f"not valid as DeepSpeed reads it (Hjson): {err.msg}", err.lineno, err.colno) from None


def parse_config(path: PathLike) -> ParsedConfig:
    """A config file read as its reader reads it. A standalone policy entry is strict JSON. A DeepSpeed config
    (``is_deepspeed_config``) is read as DeepSpeed reads it: Hjson, so comments, trailing commas and quoteless
    strings are accepted and a JSON extension such as ``Infinity`` is not. A key given twice in one object is an
    ``InputError`` naming its key path, as DeepSpeed refuses it. When both readers refuse the file, the error is
    the one further into the file; without hjson installed a DeepSpeed config is read as strict JSON."""
    text = read_text(path)
    duplicates: list[str] = []
    try:
        document, json_error = _objects(json.loads(text, object_pairs_hook=_Pairs), "", duplicates), None
    except json.JSONDecodeError as err:
        document, json_error = None, InputError(path, f"not valid JSON: {err.msg}", err.lineno, err.colno)
    hjson_only = False
    if json_error is not None or is_deepspeed_config(document):
        try:
            hjson_pairs = _hjson_pairs(text, path)
        except ImportError:
            if json_error is not None:
                raise InputError(path, f"{json_error.message} (DeepSpeed reads configs with Hjson, which allows "
                                 "comments and trailing commas: pip install hjson to check the file as it does)",
                                 json_error.line, json_error.column) from None
        except InputError as hjson_error:
            if json_error is None:
                raise
            raise max((json_error, hjson_error), key=lambda e: (e.line or 0, e.column or 0)) from None
        else:
            duplicates.clear()
            document = _objects(hjson_pairs, "", duplicates)
            if json_error is not None and not is_deepspeed_config(document):
                raise json_error   # a policy entry is JSON
            hjson_only = json_error is not None
    if duplicates:
        raise InputError(path, f"key(s) given twice: {', '.join(duplicates)}; DeepSpeed refuses a config with a "
                         "key twice (and json.load would keep only the last): keep one of each")
    return ParsedConfig(document, hjson_only)


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
