"""The deformable attention's sampling core (``ms_deform_attn``) against the plain ``grid_sample``
formulation it replaces (``ms_deform_attn_grid_sample``): outputs and every gradient, in float64
(to rounding) and float32, on odd map sizes, with samples beyond the map, in chunks, with padding,
under bf16 autocast; what its backward keeps; the module's switch between the two."""

import pytest
import torch

import models.deformable as deformable
from models.deformable import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_grid_sample,
    use_grid_sample_core,
)

SHAPES = [(5, 7), (3, 4), (1, 2)]  # odd sizes, a level narrower than a sample's corners
CELLS = sum(h * w for h, w in SHAPES)


def core_inputs(
    batch=2, queries=9, heads=2, d_head=3, points=4, dtype=torch.float64, device="cpu", seed=0
):
    """value, locations and weights for ``SHAPES``; locations spread from 0.3 before the map to
    0.3 beyond it, so that some samples lie partly or wholly outside."""
    g = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    value = torch.randn(batch, CELLS, heads, d_head, generator=g, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype)
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (value, 1.6 * locations - 0.3, weights)]


def output_and_grads(core, value, locations, weights, seed=1):
    """The core's output and the gradients of a random projection of it."""
    out = core(value, SHAPES, locations, weights)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    return (out, *torch.autograd.grad(out, (value, locations, weights), grad_out))


def assert_relative(got, expected, tolerance):
    """Every element within ``tolerance`` of the largest magnitude of ``expected``."""
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a - b).abs().max().item() <= tolerance * b.abs().max().item()


@pytest.mark.parametrize("chunk", [2**22, 24, 7], ids=["one chunk", "whole queries", "uneven"])
def test_outputs_and_gradients_are_the_grid_sample_cores_in_float64(device, chunk, monkeypatch):
    """Chunks of 24 samples hold one query (2 heads x 3 levels x 4 points); of 7, one as well, at
    least one per chunk: every chunking gives the same sums."""
    monkeypatch.setattr(deformable, "CHUNK_SAMPLES", chunk)
    inputs = core_inputs(device=device)
    expected = output_and_grads(ms_deform_attn_grid_sample, *inputs)
    assert_relative(output_and_grads(ms_deform_attn, *inputs), expected, 1e-12)


def test_outputs_and_gradients_agree_in_float32(device):
    inputs = core_inputs(queries=40, heads=4, d_head=8, dtype=torch.float32, device=device)
    expected = output_and_grads(ms_deform_attn_grid_sample, *inputs)
    assert_relative(output_and_grads(ms_deform_attn, *inputs), expected, 1e-5)


def test_samples_beyond_the_map_read_zeros_and_get_no_location_gradient():
    value, locations, weights = core_inputs()
    far = torch.tensor([-0.7, 1.7], dtype=torch.float64)[
        torch.randint(2, locations.shape, generator=torch.Generator().manual_seed(3))
    ].requires_grad_()
    out, _, grad_locations, grad_weights = output_and_grads(ms_deform_attn, value, far, weights)
    assert not out.any() and not grad_locations.any() and not grad_weights.any()
    # Half a cell beyond a 1x1 map: half of it; a quarter at a corner beyond it (x and y).
    single = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    edge = torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 1, 1, 2)
    out = ms_deform_attn(single, [(1, 1)], edge, torch.ones(1, 2, 1, 1, 1, dtype=torch.float64))
    assert out.flatten().tolist() == [0.5, 0.25]


def test_nan_locations_give_nan_outputs_not_an_index_error():
    value, locations, weights = core_inputs()
    locations = locations.detach().clone()
    locations[0, 3, 1, 2, 0, 0] = float("nan")
    out = ms_deform_attn(value, SHAPES, locations, weights)
    assert out[0, 3].isnan().any() and not out[1].isnan().any()


def test_bf16_values_with_float32_locations():
    """As under autocast: values from a bf16 Linear, locations and weights in float32. Both cores
    sample the same bf16 values in float32."""
    value, locations, weights = core_inputs(dtype=torch.float32)
    value = value.detach().bfloat16().requires_grad_()
    expected = output_and_grads(ms_deform_attn_grid_sample, value, locations, weights)
    got = output_and_grads(ms_deform_attn, value, locations, weights)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    assert_relative(got[:1] + got[2:], expected[:1] + expected[2:], 1e-5)
    assert_relative(got[1:2], expected[1:2], 1e-2)  # the value's gradient, rounded to bf16


def test_only_the_gradients_asked_for():
    value, locations, weights = core_inputs()
    out = ms_deform_attn(value.detach(), SHAPES, locations, weights.detach())
    (grad,) = torch.autograd.grad(out.sum(), locations)
    expected = ms_deform_attn_grid_sample(value.detach(), SHAPES, locations, weights.detach())
    (expected_grad,) = torch.autograd.grad(expected.sum(), locations)
    assert_relative([grad], [expected_grad], 1e-12)
    out = ms_deform_attn(value, SHAPES, locations.detach(), weights.detach())
    assert torch.autograd.grad(out.sum(), value)[0].shape == value.shape


def test_gradients_are_deterministic():
    inputs = core_inputs(queries=30, dtype=torch.float32)
    first, second = (output_and_grads(ms_deform_attn, *inputs) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_backward_keeps_the_inputs_not_the_samples():
    """What the autograd graph holds for the backward (the memory a training step keeps per
    layer): the grid_sample core keeps its [B * heads, d_head, Q, L * P] samples; this core only
    its inputs (the value padded by a few cells per level), a fraction of that."""
    shapes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    cells = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, cells, 8, 32, generator=g).requires_grad_()
    locations = torch.rand(1, cells, 8, 4, 4, 2, generator=g).requires_grad_()
    weights = torch.rand(1, cells, 8, 4, 4, generator=g).requires_grad_()

    def saved_bytes(core):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            core(value, shapes, locations, weights)
        return sum(sizes)

    samples = 8 * 32 * cells * 16 * 4  # bytes of the samples tensor
    assert saved_bytes(ms_deform_attn_grid_sample) >= samples
    assert saved_bytes(ms_deform_attn) < 0.3 * samples


@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_the_attention_module_gives_the_same_results_with_either_core(box):
    """Padding zeroed in the values, parameters' gradients included."""
    torch.manual_seed(0)
    attn = MSDeformAttn(16, n_levels=3, n_heads=2, n_points=3)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    query, source = torch.randn(2, 11, 16), torch.randn(2, CELLS, 16)
    reference = torch.rand(2, 11, 3, 4 if box else 2)
    mask = torch.zeros(2, CELLS, dtype=torch.bool)
    mask[1, 20:35] = mask[1, 45:] = True
    results = []
    for grid_sample in (True, False):
        use_grid_sample_core(attn, grid_sample)
        attn.zero_grad()
        out = attn(query, reference, source, torch.tensor(SHAPES), mask)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in attn.parameters()])
    assert not attn.grid_sample_core
    assert_relative(results[1], results[0], 1e-5)


def test_bf16_autocast_agrees_with_the_grid_sample_core():
    torch.manual_seed(0)
    attn = MSDeformAttn(16, n_levels=3, n_heads=2, n_points=3)
    query, source = torch.randn(2, 11, 16), torch.randn(2, CELLS, 16)
    reference = torch.rand(2, 11, 3, 2)
    results = []
    for grid_sample in (True, False):
        attn.grid_sample_core = grid_sample
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(query, reference, source, torch.tensor(SHAPES))
        out.float().square().sum().backward()
        results.append([out.float()] + [p.grad for p in attn.parameters()])
    for got, expected in zip(results[1], results[0], strict=True):
        assert torch.isfinite(got).all()
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_samples_on_cell_centres_and_edges_take_the_grid_sample_cores_derivatives():
    """At the official initialisation every sample sits on a cell centre (integer pixel
    coordinates), where the bilinear weights' derivative jumps: both cores take the same side,
    also at -1 and at the map's size (pixel coordinates exact in binary here, so that both
    compute the same ones)."""
    shapes = [(4, 8), (2, 4)]
    pixels = torch.arange(-2.0, 9.0, 0.5, dtype=torch.float64)  # -2 ... 8.5, every half pixel
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(len(pixels), (2, 12, 2, 2, 3, 2), generator=g)
    sizes = torch.tensor([[8.0, 4.0], [4.0, 2.0]], dtype=torch.float64)[:, None]  # (W, H)
    locations = ((pixels[picks] + 0.5) / sizes).requires_grad_()
    value = torch.randn(2, 40, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    weights = torch.rand(2, 12, 2, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(2, 12, 6, generator=g, dtype=torch.float64)
    results = [
        torch.autograd.grad(
            core(value, shapes, locations, weights), (value, locations, weights), grad_out
        )  # fmt: skip
        for core in (ms_deform_attn_grid_sample, ms_deform_attn)
    ]
    assert_relative(results[1], results[0], 1e-12)
