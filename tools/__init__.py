"""Helpers the tests and the benchmarks share: running commands and the engines' launchers
(:mod:`tools.launchers`), reading a Horovod timeline (:mod:`tools.horovod_timeline`)."""
