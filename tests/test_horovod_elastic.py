"""Horovod Elastic, for real: `horovodrun` with a host-discovery script shrinks the job from 2 workers to 1."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")

from tools.launchers import REPO, VENV_BIN, horovodrun, run_command  # noqa: E402

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "tests" / "horovod_scripts"


def test_elastic_shrink_keeps_progress_and_rescales(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    # One host: Elastic's network-interface detection needs two hosts unless the interface is named.
    horovodrun(SCRIPTS / "elastic.py", [str(tmp_path)], gloo=False,
               options=["--min-np", "1", "--max-np", "2", "--network-interfaces", "lo",
                        "--host-discovery-script", str(SCRIPTS / "discover_hosts.sh")],
               timeout=300, env={"SCALING_PLUGINS_HOSTS_FILE": str(hosts)})
    records = json.loads((tmp_path / "records.json").read_text())
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))      # no step lost or repeated
    sizes = [r["size"] for r in records]
    change = sizes.index(1)
    assert set(sizes[:change]) == {2} and set(sizes[change:]) == {1} and len(sizes) - change == 4
    for record in records:                 # S = workers × backward passes; the policy follows the world
        assert record["scale"] == 2.0 * record["size"] and record["policy_world_size"] == record["size"]
        assert 1.0 <= record["gain"] <= record["scale"]
        assert record["lr"] == pytest.approx(0.05 * record["gain"], rel=1e-12)
    for before, after in zip(records, records[1:]):                             # τ carried across the change
        assert after["progress"] == before["progress"] + after["gain"]
    assert all(r["loss"] < float("inf") for r in records)


def test_checkpoint_loaded_on_another_world_size_follows_the_new_scale(tmp_path):
    script = str(SCRIPTS / "resize.py")
    horovodrun(script, ["save", str(tmp_path)], timeout=300)
    run_command([str(VENV_BIN / "python"), script, "load", str(tmp_path)], timeout=120)
    saved, loaded = (json.loads((tmp_path / f"{mode}.json").read_text()) for mode in ("save", "load"))
    assert saved["scale"] == 4.0 and loaded["scale"] == 2.0       # 2 ranks × 2 passes, then 1 × 2
    for key in ("progress", "sigma_sq", "mu_sq"):                  # τ and the base-batch estimates carry over
        assert loaded[key] == saved[key]
