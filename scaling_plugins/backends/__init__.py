"""Engine backends: each carries the local gradient norms on its engine's own reductions (``harvest``), drives
the policy once per optimizer step (``driver``) and keeps every touch of engine internals in a version-checked
``compat`` module; ``shared`` holds what they have in common. No math lives here (``scaling_plugins.stats``,
``scaling_plugins.policies``). Optional engines are imported only by their own subpackage. docs/design.md.
"""
