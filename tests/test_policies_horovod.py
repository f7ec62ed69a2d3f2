"""The fixed scaling rules, AdaScaleAdam and AutoWU through the Horovod backend under `horovodrun --gloo -np 2`:
the rules' learning rates equal their own trajectories at k = 2 ranks × 2 backward passes, AdaScaleAdam applies
base_lr·√gain to Adam, and AutoWU, fed opt.step(loss=loss), switches at the same step on both ranks
(tests/horovod_scripts/policies_run.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")

from tests.distributed import rank_results  # noqa: E402
from tests.policy_cases import RULES, check_autowu_run, check_rule_run  # noqa: E402
from tools.launchers import REPO, horovodrun  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("horovod_policies")
    horovodrun(REPO / "tests" / "horovod_scripts" / "policies_run.py", [str(out)], timeout=600)
    return rank_results(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_learning_rates(ranks, name):
    check_rule_run(name, *(rank["rules"][name] for rank in ranks))


@pytest.mark.slow
def test_autowu_switches_at_the_same_step_on_both_ranks(ranks):
    check_autowu_run(*(rank["autowu"] for rank in ranks))
