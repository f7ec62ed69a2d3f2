"""Under CI=true a skipped test is a failure: every test here needs only what `make test` installs (Horovod,
DeepSpeed, MPI, the cluster harness's Debian packages), so a skip in CI means a missing install step."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} skipped test(s) count as failures (a missing install step?)",
                            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="module")
def remove_deepspeed_shm_buffers():
    """DeepSpeed 0.19's CPU accelerator leaves its shared-memory all-reduce buffers in /dev/shm (2 × 66 MB per
    2-rank launch, never unlinked): a few hundred launches fill the machine's memory. After each test module,
    remove the ones it made (unlinking a buffer that a live process maps is safe)."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)
