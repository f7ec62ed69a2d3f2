"""Checks on a saved state before anything is loaded from it.

A ``load_state_dict`` checks the whole state first — every entry present and of its type, every number finite
(as the params schema, ``scaling_plugins.config``, refuses ``inf`` and ``nan``), nested entries such as a policy's
``statistics`` included — and only then changes anything: a refused state leaves the object exactly as it was.
A message names the entry's path, its value and what it must be, then what to load instead, e.g.

    policy state: progress = nan: must be a finite number >= 0 (the state is damaged or was edited: load the dict
    state_dict() returned, unchanged)

A state's layout is a mapping of entry name to :class:`Entry` (``Fields`` for a nested mapping). No torch here.
"""
from __future__ import annotations

import collections.abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

DAMAGED = "the state is damaged or was edited: load the dict state_dict() returned, unchanged"
SHOWN_CHARS = 80   # a value longer than this in a message is cut (a state may hold long lists)


def show(value: Any) -> str:
    """``repr(value)``, cut to ``SHOWN_CHARS`` characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def child(path: str, key: Any) -> str:
    """The path of entry ``key`` under ``path``: ``"policy state: progress"``, ``"policy state: statistics.scale"``,
    ``"policy state: stepped[2]"``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if ":" in path else f"{path}: {key}"


def refusal(path: str, value: Any, must: str, fix: str = DAMAGED) -> ValueError:
    """``ValueError``: ``<path> = <value>: must be <must> (<fix>)``."""
    return ValueError(f"{path} = {show(value)}: must be {must} ({fix})")


@dataclass(frozen=True)
class Entry:
    """One entry of a state: ``must`` says what it must be, ``accepts`` whether a value is that."""

    must: str
    accepts: Callable[[Any], bool]

    def check(self, value: Any, path: str) -> None:
        if not self.accepts(value):
            raise refusal(path, value, self.must)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number(minimum: Optional[float] = None, maximum: Optional[float] = None) -> Entry:
    """A finite number (int or float, not bool), within ``[minimum, maximum]`` where given."""
    bounds = [f">= {minimum:g}"] if minimum is not None else []
    bounds += [f"<= {maximum:g}"] if maximum is not None else []
    return Entry(" ".join(["a finite number", " and ".join(bounds)]).strip(),
                 lambda v: (_real(v) and math.isfinite(v) and (minimum is None or v >= minimum)
                            and (maximum is None or v <= maximum)))


def any_number() -> Entry:
    """A number, ``inf`` and ``nan`` allowed (a diverged loss is recorded as it was)."""
    return Entry("a number", _real)


def integer(minimum: int = 0) -> Entry:
    """An integer (not bool) >= ``minimum``."""
    return Entry(f"an integer >= {minimum}",
                 lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum)


def flag() -> Entry:
    """True or False."""
    return Entry("true or false", lambda v: isinstance(v, bool))


def one_of(choices: Sequence[Any]) -> Entry:
    """One of ``choices``."""
    return Entry(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


@dataclass(frozen=True)
class Nullable(Entry):
    """None, or what ``entry`` accepts."""

    entry: Entry

    def check(self, value: Any, path: str) -> None:
        if value is None:
            return
        if not self.entry.accepts(value):
            raise refusal(path, value, self.must)
        self.entry.check(value, path)


def nullable(entry: Entry) -> Nullable:
    return Nullable(f"{entry.must} or None", lambda v: v is None or entry.accepts(v), entry)


@dataclass(frozen=True)
class ListOf(Entry):
    """A list (or tuple) of ``length`` items (any number when None), each checked by ``element``."""

    element: Entry
    length: Optional[int]

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
            raise refusal(path, value, self.must)
        for index, item in enumerate(value):
            self.element.check(item, child(path, index))


def list_of(element: Entry, length: Optional[int] = None) -> ListOf:
    count = "a list" if length is None else f"a list of {length} items"
    return ListOf(f"{count}, each {element.must}", lambda v: isinstance(v, (list, tuple)), element, length)


@dataclass(frozen=True)
class Row(Entry):
    """A list (or tuple) whose i-th item is checked by ``items[i]``."""

    items: tuple[Entry, ...]

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            raise refusal(path, value, self.must)
        for index, (item, entry) in enumerate(zip(value, self.items)):
            entry.check(item, child(path, index))


def row(*items: Entry) -> Row:
    return Row(f"a list of {len(items)}: " + ", ".join(entry.must for entry in items),
               lambda v: isinstance(v, (list, tuple)), items)


@dataclass(frozen=True)
class Fields(Entry):
    """A nested mapping with the entries of ``layout``."""

    layout: Mapping[str, Entry]

    def check(self, value: Any, path: str) -> None:
        check_fields(value, self.layout, path)


def fields(layout: Mapping[str, Entry]) -> Fields:
    return Fields(f"a mapping with {sorted(layout)}", lambda v: isinstance(v, collections.abc.Mapping), layout)


def check_fields(state: Any, layout: Mapping[str, Entry], path: str) -> None:
    """``ValueError`` naming the first entry of ``state`` that ``layout`` does not accept: a state that is not a
    mapping, a missing entry, or a value of the wrong type (numbers: not finite, or out of range). Entries that
    ``layout`` does not name are left alone. Changes nothing."""
    if not isinstance(state, collections.abc.Mapping):
        raise refusal(path, state, f"a mapping with {sorted(layout)}")
    missing = [key for key in layout if key not in state]
    if missing:
        raise ValueError(f"{path} has no {missing[0]!r} entry (it has {sorted(map(str, state))}; {DAMAGED})")
    for key, entry in layout.items():
        entry.check(state[key], child(path, key))
