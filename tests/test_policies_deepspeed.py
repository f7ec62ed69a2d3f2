"""The fixed scaling rules, AdaScaleAdam and AutoWU as DeepSpeed config entries, through the real `deepspeed`
launcher (2 CPU ranks, gloo, ZeRO-0): the rules' learning rates equal their own trajectories at k = 2 ranks × 2 micro-batches,
AdaScaleAdam applies base_lr·√gain to Adam, and AutoWU, fed the loss of engine.backward(loss), switches at
the same step on both ranks (tests/deepspeed_scripts/policies_run.py)."""
from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from tests.distributed import rank_results  # noqa: E402
from tests.policy_cases import RULES, check_autowu_run, check_rule_run  # noqa: E402
from tools.launchers import deepspeed  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("policies")
    deepspeed("tests/deepspeed_scripts/policies_run.py", ["--out", str(out)])
    return rank_results(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_learning_rates(ranks, name):
    check_rule_run(name, *(rank["rules"][name] for rank in ranks))


@pytest.mark.slow
def test_autowu_switches_at_the_same_step_on_both_ranks(ranks):
    check_autowu_run(*(rank["autowu"] for rank in ranks))


@pytest.mark.slow
def test_autowu_given_the_loss_through_lr_kwargs_runs_the_same_trajectory(ranks):
    for rank in ranks:
        assert rank["autowu_lr_kwargs"] == rank["autowu"]
