"""Denoising queries (models/denoising.py): the noised targets, the padding of a batch, the
self-attention mask that hides them, and their loss on images with and without objects."""

import pytest
import torch

from models.aids.base import Queries, QueryBlock, self_attention_mask
from models.aids.denoising import noised_targets
from tests.conftest import NUM_CLASSES, build_tiny, tiny_batch, to_device
from util.boxes import cxcywh_to_xyxy


def targets(*counts: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Images with ``counts`` objects each: random boxes inside the image, some at its borders
    and some small."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for count in counts:
        size = 0.01 + 0.5 * torch.rand(count, 2, generator=g)
        centre = size / 2 + (1 - size) * torch.rand(count, 2, generator=g)
        centre[::3, 0] = size[::3, 0] / 2  # touching the left border
        labels = torch.randint(0, NUM_CLASSES, (count,), generator=g)
        out.append({"labels": labels, "boxes": torch.cat([centre, size], dim=1)})
    return out


def test_without_noise_the_denoising_queries_are_the_ground_truth():
    batch = targets(1, 3)
    noised = noised_targets(batch, groups=2, box_noise=0.0, label_noise=0.0, num_classes=3)
    assert noised.boxes.shape == (2, 2 * 3, 4) and noised.labels.shape == (2, 6)
    for i, target in enumerate(batch):
        count = len(target["labels"])
        assert noised.valid[i].tolist() == ([True] * count + [False] * (3 - count)) * 2
        for group in range(2):
            real = slice(3 * group, 3 * group + count)
            torch.testing.assert_close(noised.boxes[i, real], target["boxes"], atol=1e-6, rtol=0)
            assert torch.equal(noised.labels[i, real], target["labels"])
        queries, answered = noised.indices[i]
        assert len(queries) == 2 * count
        torch.testing.assert_close(
            noised.boxes[i, queries], target["boxes"][answered], atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("box_noise", [0.4, 1.0, 3.0])
def test_noised_boxes_stay_inside_the_image_with_a_positive_size(box_noise):
    batch = targets(7, 2, 0)
    torch.manual_seed(0)
    noised = noised_targets(batch, groups=20, box_noise=box_noise, label_noise=0.2, num_classes=3)
    corners = cxcywh_to_xyxy(noised.boxes)
    assert (corners >= 0).all() and (corners <= 1).all()
    assert (noised.boxes[..., 2:] > 0).all()
    original = torch.cat([t["boxes"] for t in batch]).repeat(20, 1)
    moved = noised.boxes[0, noised.valid[0]] - batch[0]["boxes"].repeat(20, 1)
    assert moved.abs().max() > 0.01 and len(original) == 20 * 9


def test_label_noise_flips_labels_to_random_classes_at_its_rate():
    batch = targets(50, 50)
    torch.manual_seed(0)
    noised = noised_targets(batch, groups=20, box_noise=0.4, label_noise=0.2, num_classes=3)
    labels = torch.cat([t["labels"] for t in batch]).view(2, 50).repeat(1, 20)
    changed = (noised.labels != labels).float().mean().item()
    assert 0.08 < changed < 0.19  # 0.2 flipped, two thirds of those to another class
    assert ((noised.labels >= 0) & (noised.labels < 3)).all()


def test_groups_are_padded_to_the_largest_object_count_and_empty_images_get_only_padding():
    noised = noised_targets(targets(0, 2), groups=3, box_noise=0.4, label_noise=0.2, num_classes=3)
    assert noised.valid.shape == (2, 3 * 2)
    assert not noised.valid[0].any() and noised.valid[1].all()
    assert len(noised.indices[0][0]) == len(noised.indices[0][1]) == 0
    assert (noised.labels[0] == 3).all()  # padding slots hold the "unknown" label
    empty = noised_targets(targets(0, 0), groups=3, box_noise=0.4, label_noise=0.2, num_classes=3)
    assert empty.valid.shape == (2, 3) and not empty.valid.any()  # one slot at least


def test_the_mask_hides_denoising_queries_from_the_matching_queries_other_groups_and_padding():
    valid = torch.tensor([[True, False, True, False], [False, False, False, False]])
    zeros = Queries(torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))
    dn = Queries(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    blocks = [
        QueryBlock("group", zeros),
        QueryBlock("dn", dn, attention_groups=2, sees_matching=True, valid=valid),
    ]
    mask = self_attention_mask(3, blocks, torch.device("cpu"))
    # Layout: [matching 0:3 | query group 1 3:6 | denoising 6:10 (2 groups of 2 slots)].
    assert mask.shape == (2, 10, 10) and mask.dtype == torch.bool
    assert mask[:, :6, 6:].all()  # matching queries see no denoising query
    assert mask[:, :3, 3:6].all() and mask[:, 3:6, :3].all()  # nor the other query group
    assert not mask[:, :3, :3].any() and not mask[:, 3:6, 3:6].any()
    assert mask[0, :, 6:][:, ~valid[0]].all() and mask[1, :, 6:].all()  # padding: seen by none
    assert not mask[0, 6, 6] and mask[0, 6, 8] and mask[0, 8, 6]  # its own group only
    assert not mask[:, 6:, :3].any() and mask[:, 6:, 3:6].all()  # group 0, not group 1
    assert (~mask).any(-1).all()  # every query sees something


def test_without_blocks_there_is_no_mask_and_without_padding_it_is_shared_by_the_batch():
    assert self_attention_mask(5, [], torch.device("cpu")) is None
    group = QueryBlock("group", Queries(torch.zeros(2, 6, 8), torch.zeros(2, 6, 8)), 2, 2)
    mask = self_attention_mask(3, [group], torch.device("cpu"))
    assert mask.shape == (9, 9)
    assert [int((~row).sum()) for row in mask] == [3] * 9  # every query sees its own group


def test_perturbing_the_denoising_queries_leaves_the_matching_queries_unchanged():
    model = build_tiny(dropout=0.0, drop_path=0.0, anchor_queries=True, dn_groups=2)[0].train()
    images, batch = tiny_batch()
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(images, targets=batch)
        torch.manual_seed(1)  # other noise
        second = model(images, targets=batch)
        plain = model.eval()(images)
    dn_change = first["dn_outputs"]["pred_boxes"] - second["dn_outputs"]["pred_boxes"]
    assert dn_change.abs().max() > 1e-3
    for out in (second, plain):
        pairs = zip([first, *first["aux_outputs"]], [out, *out["aux_outputs"]], strict=True)
        for one, other in pairs:
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(one[key], other[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("counts", [(0, 2), (0, 0)], ids=["one empty", "all empty"])
def test_the_denoising_loss_is_finite_for_images_without_objects(counts, device):
    model, criterion, _ = build_tiny(anchor_queries=True, dn_groups=2)
    model.to(device)
    images, batch = to_device(tiny_batch()[0], targets(*counts), device)
    losses = criterion(model(images, targets=batch), batch)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"} <= set(losses)
    total = criterion.weighted_total(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_denoising_needs_the_targets_in_training_only():
    model = build_tiny(anchor_queries=True, dn_groups=2)[0]
    images, _ = tiny_batch()
    with pytest.raises(ValueError, match="targets"):
        model(images)
    assert "dn_outputs" not in model.eval()(images)
