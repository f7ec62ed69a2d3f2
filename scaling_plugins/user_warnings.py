"""Messages for the user, about a mistake in their set-up or loop that they can fix, shown with no logging set-up.

They are Python warnings of the package's own category, :class:`ScalingWarning` (a ``UserWarning``), attributed
to the line of the user's code that led to them (the nearest frame outside this package and the engines it
drives). By default Python shows each one once per place; the usual filters silence them or turn them into
errors:

    warnings.filterwarnings("error", category=scaling_plugins.ScalingWarning)
    python -W error::scaling_plugins.ScalingWarning train.py

Records of what the package itself does (a documented fallback taken, a skipped step's statistics) stay on the
``scaling_plugins`` logger, which prints nothing until the application sets up logging.
"""
from __future__ import annotations

import sys
import warnings

ENGINE_PACKAGES = frozenset({"scaling_plugins", "torch", "deepspeed", "horovod", "transformers", "accelerate"})


class ScalingWarning(UserWarning):
    """A problem in the user's set-up or training loop that scaling_plugins found and the user can fix."""


def warn_user(message: str) -> None:
    """Show ``message`` as a :class:`ScalingWarning` at the user's line that led to it."""
    warnings.warn(message, ScalingWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, counted from :func:`warn_user`, of the nearest frame whose module is not in
    ``ENGINE_PACKAGES`` (the outermost frame when every frame is)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in ENGINE_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level
