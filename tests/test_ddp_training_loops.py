"""The DDP backend in the training loops real jobs bring (2 real gloo ranks): accumulation without no_sync(),
parameters DDP ignores, gradient penalties (torch.autograd.grad), SAM's two backward passes, fp16/bf16
gradients with norms above 65,504 and below 1e-4, DDP's fp16/bf16 compression hooks, and the ops added per step.

Each test recomputes the step's gain offline from what it captured itself: every rank's local gradients of the
step's own passes (its own tensor hooks, before DDP reduces them) and the reduced gradient the optimizer
applied (``.grad`` after the step), with AdaScale's estimator written out in ``tests.loop_checks.raw_gain`` (no
smoothing, so each step's gain is that step's estimate).
"""
import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook, fp16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach
from tests.distributed import run_ranks
from tests.loop_checks import Capture, applied_sq_norm, raw_gain, sam_perturbation, shift
from tests.profiling import top_level_ops

RAW = {"type": "AdaScale", "params": {"smoothing": 0}}


class DDPCapture(Capture):
    """``Capture`` switched on for a block, summed over the ranks when taken."""

    @contextlib.contextmanager
    def passes(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def take(self) -> float:
        total = torch.tensor([super().take()], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)


def batch(rank: int, step: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 * rank + step))


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


# -- accumulation with and without no_sync() ---------------------------------------------------------------------
def accumulated_gains(rank, world, use_no_sync):
    net = small_net()
    ddp = DDP(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    driver = attach(ddp, optimizer, RAW, accumulation_steps=4)
    capture = DDPCapture(net.parameters())
    rows = []
    for step in range(3):
        for micro in range(4):
            sync = contextlib.nullcontext() if micro == 3 or not use_no_sync else ddp.no_sync()
            with sync, capture.passes():
                (ddp(batch(rank, 10 * step + micro, 5, 3)).pow(2).mean() / 4).backward()
        driver.step()
        # each captured gradient is g_i/4 (the loss is divided by the accumulation): L = 16·Σ‖captured‖²
        rows.append((driver.gain, raw_gain(16 * capture.take(), applied_sq_norm(net.parameters()), 8, 8),
                     driver.metrics()["sigma_sq"]))
        optimizer.zero_grad()
    return rows


def test_accumulation_without_no_sync_gives_the_same_statistics_as_with_it():
    """Without no_sync() DDP reduces every micro-batch; L covers all four micro-batches (it once covered only the
    last: 161.3 against 206.3), so the gains equal the no_sync() run's and the offline estimate."""
    with_sync = run_ranks(accumulated_gains, 2, True)
    without = run_ranks(accumulated_gains, 2, False)
    for rank in range(2):
        for (gain, offline, sigma), (gain_2, offline_2, sigma_2) in zip(with_sync[rank], without[rank]):
            assert gain == pytest.approx(offline, rel=1e-6) and gain_2 == pytest.approx(offline_2, rel=1e-6)
            assert gain_2 == pytest.approx(gain, rel=1e-6) and sigma_2 == pytest.approx(sigma, rel=1e-6)
            assert 1.0 < gain < 8.0
    assert with_sync[0] == with_sync[1] and without[0] == without[1]


# -- one pass per step: the buckets read by the meter, the last one carrying the sum in its own grown storage --
def one_pass_gains(rank, world, as_view, set_to_none):
    torch.set_num_threads(1)    # two intra-op threads round fp32 sums of this size differently from launch to launch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 1))
    ddp = DDP(net, bucket_cap_mb=0.1, gradient_as_bucket_view=as_view)      # 83K parameters: several buckets
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    driver = attach(ddp, optimizer, RAW)
    capture = DDPCapture(net.parameters())
    rows = []
    for step in range(3):                                                   # DDP rebuilds its buckets after one
        with capture.passes():
            ddp(batch(rank, step, 16, 64)).pow(2).mean().backward()
        driver.step()
        rows.append((driver.gain, raw_gain(capture.take(), applied_sq_norm(net.parameters()), 2, 2)))
        optimizer.zero_grad(set_to_none=set_to_none)
    return rows, [p.detach().clone() for p in net.parameters()]


def test_one_pass_steps_match_the_offline_gain_with_and_without_bucket_views():
    """Each bucket of a fresh pass is measured in the communication hook and the last bucket's storage is grown to
    carry the sum: the gains equal the offline estimate whether .grad is DDP's bucket (gradient_as_bucket_view) or
    not, and whether zero_grad() leaves .grad None (the buckets are read) or zeros (the gradients are read); bucket
    views or not, a run trains to the same parameters, bit for bit, and the ranks agree. (Gradients of more than
    EXACT_NUMEL elements are read in fp32: the gain is within 3e-6 of the float64 estimate here, as it was before
    the buckets were read.)"""
    runs = {(as_view, none): run_ranks(one_pass_gains, 2, as_view, none) for as_view in (False, True)
            for none in (True, False)}
    for (as_view, none), ranks in runs.items():
        for rows, params in ranks:
            for gain, offline in rows:
                assert gain == pytest.approx(offline, rel=1e-5) and 1.0 < gain < 2.0, (as_view, none, rows)
            for mine, theirs in zip(params, runs[(False, none)][0][1]):    # .grad in the bucket or not: no change
                assert torch.equal(mine, theirs), (as_view, none)
        assert ranks[0][0] == ranks[1][0]


# -- parameters DDP ignores -----------------------------------------------------------------------------------------
class Gate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), 5.0))     # trained on each rank alone, never reduced

    def forward(self, x):
        return x * self.weight


class WithIgnored(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.net = small_net()

    def forward(self, x):
        return self.net(self.gate(x))


def ignored_parameter_gain(rank, world):
    model = WithIgnored()
    model._ddp_params_and_buffers_to_ignore = ["gate.weight"]
    ddp = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    driver = attach(ddp, optimizer, RAW)
    capture = DDPCapture(model.net.parameters())                   # what DDP reduces
    with capture.passes():
        ddp(batch(rank, 0, 5, 3)).pow(2).mean().backward()
    driver.step()
    unreduced = model.gate.weight.grad.clone()
    dist.all_reduce(unreduced)
    assert not torch.equal(unreduced / 2, model.gate.weight.grad)      # DDP really left it alone
    return driver.gain, raw_gain(capture.take(), applied_sq_norm(model.net.parameters()), 2, 2)


def test_parameters_ddp_ignores_are_not_measured():
    """A parameter in _ddp_params_and_buffers_to_ignore has a gradient but is never reduced: it is left out of L
    as it is out of T (counted in L it inflated σ²: 0.531 against 0.361)."""
    for gain, offline in run_ranks(ignored_parameter_gain, 2):
        assert gain == pytest.approx(offline, rel=1e-6)
        assert 1.0 < gain < 2.0


# -- extra autograd passes: a gradient penalty, SAM ---------------------------------------------------------------
def gradient_penalty_gains(rank, world):
    net = small_net()
    ddp = DDP(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    driver = attach(ddp, optimizer, RAW)
    capture = DDPCapture(net.parameters())
    rows = []
    for step in range(3):
        loss = ddp(batch(rank, step, 5, 3)).pow(2).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)   # the penalty's own pass
        penalty = 0.1 * sum(g.pow(2).sum() for g in grads)
        with capture.passes():
            (loss + penalty).backward()
        driver.step()
        rows.append((driver.gain, raw_gain(capture.take(), applied_sq_norm(net.parameters()), 2, 2)))
        optimizer.zero_grad()
    return rows


def test_a_gradient_penalty_pass_is_not_counted():
    """torch.autograd.grad with respect to the parameters fires their tensor hooks but accumulates nothing: it
    is neither measured (it doubled L) nor counted against the accumulation (3 steps in a row would be an
    error)."""
    results = run_ranks(gradient_penalty_gains, 2)
    for gain, offline in results[0]:
        assert gain == pytest.approx(offline, rel=1e-6) and 1.0 < gain < 2.0
    assert results[0] == results[1]


def sam_gains(rank, world, first_pass_synced):
    net = small_net()
    ddp = DDP(net)
    params = list(net.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    driver = attach(ddp, optimizer, RAW)
    capture = DDPCapture(params)
    rows = []
    for step in range(3):
        x = batch(rank, step, 5, 3)
        sync = contextlib.nullcontext() if first_pass_synced else ddp.no_sync()
        with sync, driver.extra_backward():                          # SAM's ascent pass: finds the perturbation
            ddp(x).pow(2).mean().backward()
        perturbation = sam_perturbation(params)
        shift(params, perturbation, 1.0)
        optimizer.zero_grad()
        with capture.passes():                                    # the step's own gradient, at the perturbed point
            ddp(x).pow(2).mean().backward()
        shift(params, perturbation, -1.0)
        driver.step()
        rows.append((driver.gain, raw_gain(capture.take(), applied_sq_norm(params), 2, 2)))
        optimizer.zero_grad()
    return rows


@pytest.mark.parametrize("first_pass_synced", [False, True], ids=["ascent under no_sync", "ascent reduced"])
def test_sam_measures_only_the_second_pass(first_pass_synced):
    """driver.extra_backward() leaves SAM's first pass out of the statistics and the pass count (DDP may reduce
    it or not); the gain is the second pass's, every step, on both ranks."""
    results = run_ranks(sam_gains, 2, first_pass_synced)
    for gain, offline in results[0]:
        assert gain == pytest.approx(offline, rel=1e-6) and 1.0 < gain < 2.0
    assert results[0] == results[1]


# -- fp16/bf16 gradients and DDP's compression hooks --------------------------------------------------------------
def low_precision_gain(rank, world, dtype, magnitude, hook):
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 1, bias=False).to(dtype)
    ddp = DDP(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-12)
    driver = attach(ddp, optimizer, RAW, comm_hook=hook)
    capture = DDPCapture(model.parameters())
    # the gradient of output.sum() is the input row: elements about ±magnitude, a norm of about 45·magnitude
    x = (batch(rank, 0, 1, 2048) + 0.5).mul(magnitude).to(dtype)
    with capture.passes():
        ddp(x).sum().backward()
    driver.step()
    local_norm = float(x.double().norm())
    return driver.gain, raw_gain(capture.take(), applied_sq_norm(model.parameters()), 2, 2), local_norm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [2000.0, 1e-6], ids=["norm above 65504", "norm below 1e-4"])
def test_fp16_and_bf16_gradients_give_the_exact_gain(dtype, magnitude):
    """Low-precision buckets: the local sums are accumulated in fp32 and ride the bucket as exact small integers
    (a fp16 dot product overflowed above 65,504 and pinned the gain at 1; one bf16 element kept 8 bits)."""
    for gain, offline, local_norm in run_ranks(low_precision_gain, 2, dtype, magnitude, None):
        assert (local_norm > 65504) == (magnitude > 1) and (local_norm < 1e-4) == (magnitude < 1)
        assert gain == pytest.approx(offline, rel=1e-5)
        assert 1.0 < gain < 2.0


@pytest.mark.parametrize("hook, tolerance", [(fp16_compress_hook, 1e-3), (bf16_compress_hook, 1e-2)],
                         ids=["fp16_compress_hook", "bf16_compress_hook"])
def test_compression_hooks_keep_the_gain(hook, tolerance):
    """attach(comm_hook=...) wraps DDP's compression hooks: the gain is exact for the gradients the optimizer
    applied (the compressed average), and within the compression's rounding of the uncompressed run's, also
    where the local squared norms (about 1.6e10) are far above fp16's range."""
    compressed = run_ranks(low_precision_gain, 2, torch.float32, 2000.0, hook)
    plain = run_ranks(low_precision_gain, 2, torch.float32, 2000.0, None)
    for (gain, offline, _), (plain_gain, _, _) in zip(compressed, plain):
        assert gain == pytest.approx(offline, rel=1e-5)
        assert gain == pytest.approx(plain_gain, rel=tolerance)
        assert 1.0 < gain < 2.0


# -- ops added per step --------------------------------------------------------------------------------------------
ELEMENTS = 16 * 4096


class Tensors(torch.nn.Module):
    """``count`` parameter tensors of ``ELEMENTS`` elements in all; forward(w) = w·Σ‖p‖²."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(ELEMENTS // count))
                                              for _ in range(count)])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * sum((p * p).sum() for p in self.params)


def ops_added(rank, world):
    """Top-level aten ops per step of DDP + AdaScale minus bare DDP, one bucket, 16 or 160 tensors of the same
    total size, with and without accumulation."""
    torch.set_num_threads(1)
    results = {}
    for passes in (1, 2):
        for tensors in (16, 160):
            counts = {}
            for scaled in (False, True):
                torch.manual_seed(0)
                model = Tensors(tensors)
                ddp = DDP(model, bucket_cap_mb=64)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
                driver = attach(ddp, optimizer, "AdaScale", accumulation_steps=passes) if scaled else None

                def step() -> None:
                    for k in range(passes):
                        sync = ddp.no_sync() if k < passes - 1 else contextlib.nullcontext()
                        with sync:
                            (ddp(torch.tensor(1.0 + rank + k)) / passes).backward()
                    driver.step() if scaled else optimizer.step()
                    optimizer.zero_grad()

                for _ in range(2):
                    step()
                counts[scaled] = sorted(top_level_ops(step) for _ in range(3))[1]
                gain = driver.gain if scaled else None
                del ddp, driver
            results[f"{tensors}x{passes}"] = {"added": counts[True] - counts[False], "bare": counts[False],
                                              "gain": gain}
    return results


def test_ops_added_per_step_do_not_grow_with_the_number_of_tensors():
    """torch.profiler's top-level ops (the CPU stand-in for kernel launches): the same with 10× the tensors in
    one bucket, with and without accumulation (a per-parameter read added 3 ops per tensor and pass)."""
    results = run_ranks(ops_added, 2)[0]
    for passes in (1, 2):
        few, many = results[f"16x{passes}"], results[f"160x{passes}"]
        assert many["bare"] > few["bare"] + 100           # the step's own work grows with the tensors
        assert 0 < many["added"] <= few["added"], results
        assert 1.0 < few["gain"] <= 2.0 * passes and 1.0 < many["gain"] <= 2.0 * passes
