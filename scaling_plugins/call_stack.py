"""Finding the object whose method is calling us, for hooks that a framework calls without that object."""
from __future__ import annotations

import sys
from typing import Optional, TypeVar

T = TypeVar("T")


def calling_instance(kind: type[T]) -> Optional[T]:
    """The ``self`` of the nearest frame up the call stack (from this function's caller's caller) that is a
    ``kind``, or None. Used where a framework builds or calls our object without passing its owner: DeepSpeed
    builds a scheduler with only the optimizer; the Trainer calls a callback without its CallbackHandler."""
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, kind):
            return candidate
        frame = frame.f_back
    return None
