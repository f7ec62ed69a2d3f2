"""The application around the library: the ``scaling-plugins`` command (demo, report, check-config, bench), the
built-in trainer and its engine adapters, the built-in workloads, local rank spawning, the launch environment,
the quality study with its report and plots, and the batch-size advice.

The library (``scaling_plugins`` outside this package) never imports it.
"""
