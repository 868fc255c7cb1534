"""The speed options change how the detector computes, never what: activation checkpointing in
the backbone, GELU recomputation in its MLPs, and the fused attention kernel against the eager
one, in fp32 and under bf16."""

import gc
import weakref

import pytest
import torch

from models import chunked_mlp
from models.attention import set_fused_attention
from models.pvt import Block, Mlp, Stage, set_gelu_recompute, set_grad_checkpointing
from options import check_args, get_args_parser
from tests.conftest import build_tiny, tiny_batch
from training import build_optimizer


def loss_and_gradients(
    checkpointing: bool, recompute_gelu: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward (dropout and drop path on, seeded)."""
    model, criterion, _ = build_tiny()
    set_grad_checkpointing(model, checkpointing)
    set_gelu_recompute(model, recompute_gelu)
    model.train()
    images, targets = tiny_batch()
    torch.manual_seed(1)
    loss = criterion.weighted_total(criterion(model(images), targets))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_checkpoint_backbone_gives_the_same_loss_and_gradients():
    loss, grads = loss_and_gradients(checkpointing=False)
    loss_ckpt, grads_ckpt = loss_and_gradients(checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-5)
    assert grads_ckpt.keys() == grads.keys()
    assert any(name.startswith("backbone.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_gelu_recompute_gives_identical_loss_and_gradients():
    loss, grads = loss_and_gradients(checkpointing=False, recompute_gelu=False)
    loss_re, grads_re = loss_and_gradients(checkpointing=False, recompute_gelu=True)
    assert torch.equal(loss_re, loss)
    assert grads_re.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_re[name], grad), name


@pytest.mark.parametrize("recompute", [False, True])
def test_gelu_output_is_kept_for_backward_only_without_recompute(recompute):
    torch.manual_seed(0)
    mlp = Mlp(8, 64, recompute_gelu=recompute)
    kept = []  # the GELU output's memory: a view of it kept for backward would keep it too
    mlp.act.register_forward_hook(
        lambda module, args, out: kept.append(weakref.ref(out.untyped_storage()))
    )
    x = torch.randn(2, 10, 8, requires_grad=True)
    out = mlp(x)
    gc.collect()
    assert (kept[0]() is not None) == (not recompute)  # alive only while autograd holds it
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_checkpoint_backbone_recomputes_blocks_in_backward_only_when_training():
    model, criterion, _ = build_tiny()
    set_grad_checkpointing(model, True)
    calls = []  # pre-hooks: a recomputation stops once it has what backward needs, before the end
    for module in model.modules():
        if isinstance(module, Block):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    blocks = sum(isinstance(m, Block) for m in model.modules())
    images, targets = tiny_batch()
    with torch.no_grad():
        model(images)
    assert len(calls) == blocks
    calls.clear()
    criterion.weighted_total(criterion(model(images), targets)).backward()
    assert len(calls) == 2 * blocks


def outputs_both_paths(amp: bool, device: torch.device) -> tuple[dict, dict]:
    """The whole detector's outputs (backbone and transformer, padded batch) on both paths."""
    model = build_tiny()[0].eval().to(device)
    images = [image.to(device) for image in tiny_batch()[0]]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        fused = model(images)
        eager = set_fused_attention(model, False)(images)
    return fused, eager


# fp32: rounding only (CUDA's fused kernels sum in other orders: 1e-4); bf16: a few units in the
# last place of values near 1 (8 bits of mantissa).
@pytest.mark.parametrize(("amp", "tolerance"), [(False, 1e-5), (True, 3e-2)])
def test_fused_and_eager_paths_agree_for_the_whole_detector(amp, tolerance, device):
    tolerance = max(tolerance, 1e-4) if device.type == "cuda" else tolerance
    fused, eager = outputs_both_paths(amp, device)
    assert fused["pred_logits"].dtype == (torch.bfloat16 if amp else torch.float32)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(
            fused[key].float(), eager[key].float(), rtol=tolerance, atol=tolerance, msg=key
        )


@pytest.mark.parametrize("flag", ["--checkpoint_backbone", "--recompute_gelu"])
def test_recomputation_flags_are_refused_for_resnet50(flag):
    args = get_args_parser().parse_args(["--backbone", "resnet50", flag])
    with pytest.raises(SystemExit, match="PVT backbones"):
        check_args(args)


def test_recompute_gelu_with_checkpoint_backbone_is_refused():
    args = get_args_parser().parse_args(["--checkpoint_backbone", "--recompute_gelu"])
    with pytest.raises(SystemExit, match="drop --recompute_gelu"):
        check_args(args)


def test_recompute_gelu_flag_reaches_every_mlp():
    args = get_args_parser().parse_args(["--recompute_gelu"])
    model = set_gelu_recompute(build_tiny()[0], args.recompute_gelu)
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert mlps and all(m.recompute_gelu for m in mlps)


@pytest.mark.parametrize("amp", [False, True])
def test_chunked_mlp_computes_what_the_whole_mlp_does(amp):
    torch.manual_seed(0)
    mlp = Mlp(8, 64).eval()
    mlp.chunk_values = 64 * 3  # 3 tokens per chunk: 10 tokens make 4 chunks, the last short
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        chunked = mlp(x)
        mlp.chunked = False
        whole = mlp(x)
    assert chunked.shape == whole.shape and chunked.dtype == whole.dtype
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_chunks_only_where_nothing_records_for_backward(monkeypatch):
    mlp = Mlp(8, 64)
    calls = []
    inplace = chunked_mlp.inplace_chunks
    monkeypatch.setattr(chunked_mlp, "inplace_chunks", lambda *a: calls.append(1) or inplace(*a))
    mlp(torch.randn(2, 5, 8)).sum().backward()  # parameters require grad: whole, recorded
    assert not calls and mlp.fc1.weight.grad is not None
    mlp.requires_grad_(False)
    mlp(torch.randn(2, 5, 8))  # a frozen backbone: nothing to record
    assert calls


def test_resized_position_embedding_is_reused_only_while_unchanged():
    model = build_tiny()[0].eval()
    stage = next(m for m in model.modules() if isinstance(m, Stage))
    with torch.no_grad():
        first = stage.resized_pos_embed(20, 30)
        assert stage.resized_pos_embed(20, 30) is first
        assert stage.resized_pos_embed(20, 31).shape[1] == 20 * 31
        second = stage.resized_pos_embed(20, 30)
        assert second is not first
        torch.testing.assert_close(second, first)
        stage.pos_embed.add_(1.0)  # an optimizer step or load_state_dict changes it in place
        torch.testing.assert_close(stage.resized_pos_embed(20, 30), first + 1.0)
    trained = stage.resized_pos_embed(20, 30)  # with autograd: computed afresh, with a graph
    assert trained.requires_grad and trained.grad_fn is not None


@pytest.mark.parametrize("recompute", [False, True])
def test_chunked_mlp_gives_the_gradients_of_the_whole_mlp(recompute):
    torch.manual_seed(0)
    mlp = Mlp(8, 64, recompute_gelu=recompute)
    mlp.chunk_values = 64 * 3  # 10 tokens: 4 chunks
    x = torch.randn(2, 5, 8, requires_grad=True)
    results = []
    for chunked in (True, False):
        mlp.chunked = chunked
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        out = mlp(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in mlp.parameters()])
    for chunked, whole in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_is_fused_on_the_cpu_unless_asked_not_to(fused):
    model = build_tiny()[0]
    optimizer = build_optimizer(model, get_args_parser().parse_args([]), fused=fused)
    assert optimizer.defaults["fused"] is fused
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 1e-5]
