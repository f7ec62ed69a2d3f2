"""Counting the ops a piece of code runs, with torch.profiler (the CPU stand-in for kernel launches)."""
from __future__ import annotations

from typing import Callable

import torch


def top_level_ops(fn: Callable[[], object]) -> int:
    """How many aten ops ``fn()`` runs that no other aten op called (an op and the ops inside it count once), on
    every thread: a communication thread's ops too (gloo's, and the reduction callbacks run there), which the
    profiler leaves out by default."""
    every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                experimental_config=every_thread) as prof:
        fn()
    count = 0
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += event.name.startswith("aten::") and parent is None
    return count
