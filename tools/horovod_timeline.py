"""Reading Horovod's HOROVOD_TIMELINE (Chrome trace JSON written by rank 0): which tensors shared a response.

Horovod executes each all-reduce response (one fusion buffer) by starting all its tensors' ALLREDUCE
activities back to back, so a run of consecutive ALLREDUCE starts in the trace is one response.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

NORM = "scaling_plugins.local_sq_norm"


def fusion_batches(timeline: Path) -> list[list[str]]:
    """The tensor names of each executed all-reduce response, in execution order."""
    text = timeline.read_text().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")     # Horovod may leave the array open
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name" and "name" in e["args"]}
    batches: list[list[str]] = []
    current = None
    for event in events:
        if event.get("ph") == "B" and event.get("name") == "ALLREDUCE":
            if current is None:
                current = []
                batches.append(current)
            current.append(names[event["pid"]])
        elif event.get("ph") not in (None, "M"):
            current = None
    return batches


def tensor_role(name: str) -> tuple[str, str]:
    """("norm" | "grad", case) of a timeline tensor name whose parameter names start with "<case>."."""
    base = re.sub(r"^(grouped_)?allreduce\.", "", name)
    grouped = re.match(r"(.*)_(\d+)of(\d+)$", base)
    if grouped:
        base = grouped.group(1)
    if base.startswith(NORM + "."):
        base = base[len(NORM) + 1:]
        is_norm = grouped is None or grouped.group(2) == grouped.group(3)   # the norm is a group's last tensor
        return ("norm" if is_norm else "grad"), base.split(".")[0]
    return "grad", base.split(".")[0]


def norm_placement(batches: list[list[str]]) -> tuple[dict[str, int], dict[str, int]]:
    """Per case: how many norms shared a response with that case's gradients, and how many went alone."""
    fused: dict[str, int] = {}
    alone: dict[str, int] = {}
    for batch in batches:
        roles = [tensor_role(name) for name in batch]
        grad_cases = {case for role, case in roles if role == "grad"}
        for role, case in roles:
            if role == "norm":
                target = fused if case in grad_cases else alone
                target[case] = target.get(case, 0) + 1
    return fused, alone
