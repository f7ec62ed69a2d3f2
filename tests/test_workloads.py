"""Built-in workloads: real bundled data, deterministic sampling, held-out validation, and the noisy quadratic's
exact gain reproduced end to end by the trainer on 2 gloo ranks."""
import pytest
import torch

from scaling_plugins.app.spawn import run_local
from scaling_plugins.telemetry import read_jsonl
from scaling_plugins.app.training import RunSpec
from scaling_plugins.app.workloads import WORKLOADS, get_workload


@pytest.fixture(scope="module", params=sorted(WORKLOADS))
def workload(request):
    return get_workload(request.param, seed=3)


def test_registry_names_the_three_workloads():
    assert sorted(WORKLOADS) == ["charlm", "digits", "quadratic"]
    with pytest.raises(ValueError, match="valid workloads"):
        get_workload("mnist")


def test_model_and_data_are_deterministic_for_a_seed(workload):
    again = get_workload(workload.name, seed=3)
    for a, b in zip(workload.make_model().parameters(), again.make_model().parameters()):
        assert torch.equal(a, b)
    x1, y1 = workload.micro_batch_at(40, 1, 2, 3)
    x2, y2 = again.micro_batch_at(40, 1, 2, 3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = get_workload(workload.name, seed=4)
    assert not torch.equal(other.stream_indices(0, 64), workload.stream_indices(0, 64))


def test_every_scale_reads_the_same_sample_stream(workload):
    """Steps at any S = world × accumulation, fixed or changing from step to step, hold exactly the samples of
    the reference's steps (one micro-batch each) in the same order."""
    world, accumulations = 2, [3, 1, 4, 2]
    seen, scaled = 7 * workload.micro_batch_size, []
    for accumulation in accumulations:
        scaled += [workload.micro_batch_at(seen, rank, world, micro)[0]
                   for micro in range(accumulation) for rank in range(world)]
        seen += world * accumulation * workload.micro_batch_size
    micro_batches = world * sum(accumulations)
    reference = [workload.micro_batch_at((7 + i) * workload.micro_batch_size, 0, 1, 0)[0]
                 for i in range(micro_batches)]
    assert torch.equal(torch.cat(scaled), torch.cat(reference))


def test_one_epoch_visits_every_training_sample_once(workload):
    indices = workload.stream_indices(0, workload.num_train)
    assert torch.equal(indices.sort().values, torch.arange(workload.num_train))
    # the next epoch is a different permutation, and a batch may straddle the two
    assert not torch.equal(workload.stream_indices(workload.num_train, 32), indices[:32])
    assert len(workload.stream_indices(workload.num_train - 5, 10).unique()) >= 5


def test_validation_is_held_out_and_evaluates(workload):
    assert len(workload.val_x) > 0
    if workload.name != "quadratic":  # real data: no validation example appears in the training set
        train_rows = {tuple(row.flatten().tolist()) for row in workload.train_x}
        overlap = sum(tuple(row.flatten().tolist()) in train_rows for row in workload.val_x)
        assert overlap <= 0.02 * len(workload.val_x)   # digits has a few duplicated images in the source data
    result = workload.evaluate(workload.make_model())
    assert result.loss > 0
    assert (result.accuracy is None) == (workload.name == "quadratic")


def test_real_data_ships_with_installed_packages():
    digits = get_workload("digits")
    assert len(digits.train_x) + len(digits.val_x) == 1797
    assert digits.train_x.shape[1:] == (1, 8, 8) and 0 <= digits.train_x.min() and digits.train_x.max() <= 1
    charlm = get_workload("charlm")
    text = "".join(charlm_decode(charlm.train_x[:40]))
    assert "statement" in text or "expression" in text   # the Python Language Reference, shipped as pydoc_data


def charlm_decode(windows):
    from scaling_plugins.app.workloads.charlm import VOCABULARY

    return [VOCABULARY[i] for i in windows.flatten().tolist()]


def test_untrained_models_score_at_chance():
    digits = get_workload("digits")
    assert 0.03 < digits.evaluate(digits.make_model()).accuracy < 0.25
    quadratic = get_workload("quadratic")
    # E ½‖w − x‖² = ½(‖w₀‖² + d·ν) at w₀ = 1
    assert quadratic.evaluate(quadratic.make_model()).loss == pytest.approx(0.5 * (16 + 16), rel=0.05)


def test_quadratic_gain_matches_the_closed_form_end_to_end(tmp_path):
    """lr = 0 keeps w at w₀ (μ² = ‖w₀‖² = 16, σ² = d·ν = 16): the smoothed σ², μ² and gain written to
    metrics.jsonl by a 2-rank run at S = 16 approach the exact values."""
    quadratic = get_workload("quadratic")
    spec = RunSpec(name="q", workload="quadratic", workers=2, accumulation=8, lr=0.0, budget=500, evals=1,
                   tensorboard=False)
    summary = run_local(spec, tmp_path / "q", progress_bar=False)
    last = read_jsonl(tmp_path / "q" / "metrics.jsonl")[-1]
    exact = quadratic.exact_gain(quadratic.make_model().w, 16)
    assert exact == pytest.approx(32 / 17)
    assert last["gain"] == pytest.approx(exact, rel=0.05)
    assert last["sigma_sq"] == pytest.approx(16, rel=0.1) and last["mu_sq"] == pytest.approx(16, rel=0.1)
    assert summary["steps"] == pytest.approx(500 / exact, rel=0.1)   # τ advanced by the gain each step
