"""The fused norm reads (scaling_plugins.backends.shared.fused_norms) and the wide payload (wide_payload), in process."""
from __future__ import annotations

import math

import pytest
import torch

from scaling_plugins.backends.shared.fused_norms import (CHUNK_NUMEL, EXACT_NUMEL, PIECE_NUMEL, BucketNormMeter,
                                                  ChunkedNormMeter, squared_norm_sum)
from scaling_plugins.backends.shared.wide_payload import WidePayload
from tests.profiling import top_level_ops


def reference(tensors):
    return sum(float((t.double() ** 2).sum()) for t in tensors)


@pytest.mark.parametrize("scale", [1.0, 3e5, 1e-7])
def test_squared_norm_sum_matches_float64_for_every_dtype_and_size(scale):
    """Small tensors exact to float64; large fp32 ones and bf16/fp16 ones to fp32 precision, across the range
    (bf16 norms above 65,504 and below 1e-4)."""
    generator = torch.Generator().manual_seed(0)
    small = [torch.randn(7, generator=generator) * scale, torch.randn(3, 5, generator=generator) * scale]
    big = torch.randn(EXACT_NUMEL + 5, generator=generator) * scale
    low = torch.randn(3 * PIECE_NUMEL + 11, generator=generator).mul(scale).bfloat16()
    assert float(squared_norm_sum(small)) == pytest.approx(reference(small), rel=1e-15)
    assert float(squared_norm_sum(small + [big])) == pytest.approx(reference(small + [big]), rel=1e-6)
    value = float(squared_norm_sum([low]))
    assert value == pytest.approx(reference([low]), rel=1e-5)
    assert (math.sqrt(value) > 65504) == (scale > 1) and (math.sqrt(value) < 1e-4) == (scale < 1e-3)
    half = (torch.randn(PIECE_NUMEL + 3, generator=generator) * 300).half()        # fp16 norm above 65,504
    assert float(squared_norm_sum([half])) == pytest.approx(reference([half]), rel=1e-5)   # fp16: > 65,504 too


def test_a_large_float32_gradient_on_cpu_keeps_float64_accuracy():
    """A 10.5M-element fp32 gradient (a DDP bucket of the benchmark MLP) with a mean far from zero: torch's CPU norm
    kernel alone is off by about 8e-4 of the square there; the row-wise read must stay near float64's answer."""
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(10_500_000 + 7, generator=generator) * 1e-3 + 1e-4
    exact = reference([grad])
    whole_tensor_norm = float(torch.linalg.vector_norm(grad)) ** 2
    assert abs(whole_tensor_norm - exact) > 1e-5 * exact       # the kernel's own error, which the read avoids
    assert float(squared_norm_sum([grad])) == pytest.approx(exact, rel=1e-8)


def test_low_precision_gradients_are_never_copied_whole():
    """bf16 gradients: every cast the read makes covers at most one piece, never the whole gradient."""
    grad = torch.randn(8 * PIECE_NUMEL).bfloat16()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        squared_norm_sum([grad])
    copies = [e for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")]
    assert copies                                      # on CPU the fp32 accumulation does cast, piece by piece
    sizes = [math.prod(shape) for e in copies for shape in e.input_shapes[:1] if shape]
    assert sizes and max(sizes) <= PIECE_NUMEL


@pytest.mark.parametrize("accumulation", [1, 3])
def test_meter_ops_do_not_grow_with_the_number_of_tensors(accumulation):
    """Same number of elements in 16 or 160 tensors: the meter adds the same number of ops per step, and L is
    the sum over passes of each pass's own ‖g‖²."""
    added = {}
    for count in (16, 160):
        params = [torch.nn.Parameter(torch.randn(4096 * 16 // count)) for _ in range(count)]
        def step(meter=None):
            for k in range(accumulation):
                loss = sum(((k + 1) * p * p).sum() for p in params)
                loss.backward()
            if meter is not None:
                meter.take()
            for p in params:
                p.grad = None
        step()
        bare = top_level_ops(step)
        meter = ChunkedNormMeter(params)
        measured = top_level_ops(lambda: step(meter))
        added[count] = measured - bare
        for k in range(accumulation):                   # L: each pass's gradient 2(k+1)p, squared and summed
            ((k + 1) * sum((p * p).sum() for p in params)).backward()
        expected = sum(4 * (k + 1) ** 2 for k in range(accumulation)) * reference([p.detach() for p in params])
        assert float(meter.take()) == pytest.approx(expected, rel=1e-6)     # fp32 gradients
    assert 0 < added[160] <= added[16], added


@pytest.mark.parametrize("chunk_by_reference", [True, False])
def test_gradients_held_in_grad_are_read_once_at_the_pass_end_unless_they_count_towards_chunks(chunk_by_reference):
    """Two passes over 32 × CHUNK_NUMEL/16 elements: the first pass's gradients become .grad (held by reference),
    the second adds into them (held by value). With chunk_by_reference=False the first pass is one measurement at
    its end; either way L is the sum of each pass's own ‖g‖²."""
    params = [torch.nn.Parameter(torch.randn(CHUNK_NUMEL // 16)) for _ in range(32)]
    flushes = []
    meter = ChunkedNormMeter(params, on_flush=lambda: flushes.append(1), chunk_by_reference=chunk_by_reference)
    counts = []
    for k in range(2):
        before = len(flushes)
        sum(((k + 1) * p * p).sum() for p in params).backward()
        counts.append(len(flushes) - before)
    expected = (4 + 16) * reference([p.detach() for p in params])      # gradients 2p, then 4p
    assert float(meter.take()) == pytest.approx(expected, rel=1e-6)
    assert counts == ([2, 2] if chunk_by_reference else [1, 2])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_bucket_meter_measures_a_fresh_pass_from_its_bucket_and_any_other_pass_per_gradient(set_to_none):
    """A fake DDP reducer copies each gradient into one bucket as it is accumulated and offers the full bucket to
    the meter. A pass whose gradients became .grad (zero_grad(set_to_none=True)) is measured from the bucket, once
    (no per-gradient read besides); a pass that adds into an existing .grad (zeros, or accumulation) is refused and
    measured from its own gradients: L is each pass's own ‖g‖² either way."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, generator=generator)) for size in (7, EXACT_NUMEL + 3, 300)]
    bucket = torch.zeros(sum(p.numel() for p in params))
    views, ready, claims = bucket.split([p.numel() for p in params]), set(), []
    meter = BucketNormMeter(params)

    def reducer_hook(index, param):     # registered after the meter's hooks, as DDP's reducer is
        views[index].copy_(param.grad.reshape(-1))
        ready.add(index)
        if len(ready) == len(params):
            claims.append(meter.claim(params, bucket))
            ready.clear()

    for index, param in enumerate(params):
        param.register_post_accumulate_grad_hook(lambda param, index=index: reducer_hook(index, param))
    own = []
    for scale in (1.0, 3.0):                     # two passes of one step: the second accumulates
        grads = torch.autograd.grad(sum((scale * p * p).sum() for p in params), params)
        own.append(reference(grads))
        if scale == 1.0 and not set_to_none:
            for p in params:
                p.grad = torch.zeros_like(p)
        sum((scale * p * p).sum() for p in params).backward()
    assert claims == [set_to_none, False]
    assert float(meter.take()) == pytest.approx(sum(own), rel=1e-6)


def test_wide_payload_survives_a_bf16_reduction_with_rescaling():
    """3 ranks (1/3 is not exact in bf16), each rank's numbers in its block, bf16 sum then × 1/3: the decoded sums
    keep 28 bits over the whole range, and a non-finite number stays non-finite."""
    world = 3
    values = [torch.tensor([4.0e10 * (r + 1), -1.3e-9 * (r + 2)], dtype=torch.float64) for r in range(world)]
    carriers = [WidePayload(2, r, world).encode(values[r]).bfloat16() for r in range(world)]
    reduced = (carriers[0].float() + carriers[1].float() + carriers[2].float()).bfloat16().float().mul(1 / 3).bfloat16()
    decoded = WidePayload(2, 0, world).decode(reduced, 1 / 3)
    assert decoded.tolist() == pytest.approx(sum(v for v in values).tolist(), rel=2 ** -26)
    plain = sum(v.bfloat16().double() for v in values)     # one bf16 element per number: 8 significant bits
    assert abs(float(plain[0] / sum(values)[0]) - 1) > 2 ** -26
    poisoned = WidePayload(2, 1, world).encode(torch.tensor([float("inf"), 1.0], dtype=torch.float64)).bfloat16()
    assert not math.isfinite(float(WidePayload(2, 0, world).decode(poisoned.float().mul(1 / 3), 1 / 3)[0]))
