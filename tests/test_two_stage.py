"""Encoder query selection (--two_stage): the tokens' proposals, the selection of the decoder's
anchors (DETR) or reference boxes (the deformable transformer: Deformable DETR's selection, and
DINO's with --mixed_selection), batch invariance, the encoder's loss terms, and training."""

import pytest
import torch

import options
from models.aids.base import Queries
from models.aids.two_stage import PROPOSAL_SIZE, level_proposals, token_proposals
from models.position_encoding import sine_encoding
from models.protocol import Memory
from tests.conftest import HIDDEN, QUERIES, assert_trains_on_tiny_batch, build_tiny, tiny_batch

TWO_STAGE = {"anchor_queries": True, "two_stage": True, "dropout": 0.0, "drop_path": 0.0}
DEFORMABLE = {"transformer": "deformable", "two_stage": True, "box_refine": True,
              "dropout": 0.0, "drop_path": 0.0}  # fmt: skip
MIXED = {**DEFORMABLE, "mixed_selection": True}
ALL = pytest.mark.parametrize(
    "flags", [TWO_STAGE, DEFORMABLE, MIXED], ids=["detr", "deformable", "mixed"]
)


def test_each_token_proposes_a_small_box_at_its_cell_centre_in_its_own_image():
    padding = torch.zeros(2, 3, 4, dtype=torch.bool)
    padding[1, 2:, :] = True  # the second image is 2 x 3 cells
    padding[1, :, 3:] = True
    proposals = token_proposals(padding).view(2, 3, 4, 4)
    torch.testing.assert_close(proposals[0, 1, 2], torch.tensor([2.5 / 4, 1.5 / 3, 0.05, 0.05]))
    torch.testing.assert_close(proposals[1, 1, 2], torch.tensor([2.5 / 3, 1.5 / 2, 0.05, 0.05]))
    assert (proposals[1][padding[1]] == 1.0).all()  # padded tokens propose nothing
    assert (proposals[..., 2:][~padding] == PROPOSAL_SIZE).all()


def test_every_level_proposes_at_its_cells_with_a_side_that_doubles_per_level():
    padding = torch.zeros(2, 4, 6, dtype=torch.bool)
    padding[1, 3:, :] = True  # the second image is 3 x 5 cells, then 2 x 3
    padding[1, :, 5:] = True
    coarse = torch.zeros(2, 2, 3, dtype=torch.bool)
    coarse[1, :, 3:] = True
    coarse[1, 2:, :] = True
    shapes = torch.tensor([[4, 6], [2, 3]])
    mask = torch.cat([padding.flatten(1), coarse.flatten(1)], 1)
    proposals = level_proposals(mask, shapes)
    assert proposals.shape == (2, 24 + 6, 4)
    torch.testing.assert_close(proposals[:, :24], token_proposals(padding))
    torch.testing.assert_close(proposals[:, 24:], token_proposals(coarse, 2 * PROPOSAL_SIZE))
    torch.testing.assert_close(proposals[1, 24 + 4], torch.tensor([1.5 / 3, 1.5 / 2, 0.1, 0.1]))


def selection_of(model, images):
    """The anchors (DETR) or reference boxes (deformable) the selection gives and the
    encoder's prediction set, in training mode."""
    seen = {}
    aid = model.aids["enc"]
    original = aid.select_queries

    def record(queries, memory):
        queries, sets = original(queries, memory)
        anchors = queries.position if queries.reference is None else queries.reference
        seen["anchors"], seen["mask"] = anchors, memory.padding_mask
        return queries, sets

    aid.select_queries = record
    try:
        outputs = model(images, targets=tiny_batch()[1])
    finally:
        aid.select_queries = original
    return seen, outputs


@ALL
def test_the_anchors_are_the_best_valid_tokens_boxes_best_first_and_detached(flags):
    """Ranked by the best class (DINO's, and with anchor queries) or by class 0 (Deformable
    DETR's class-agnostic proposals)."""
    model = build_tiny(**flags)[0].train()
    images, _ = tiny_batch()
    seen, outputs = selection_of(model, images)
    enc = outputs["enc_outputs"]
    probabilities = model.class_head.probabilities(enc["pred_logits"])
    agnostic = flags is DEFORMABLE
    assert enc.get("class_agnostic", False) == agnostic
    scores = probabilities[..., 0] if agnostic else probabilities.max(-1).values
    scores = scores.masked_fill(seen["mask"], -1.0)
    best = scores.topk(QUERIES, dim=1).indices
    expected = enc["pred_boxes"].gather(1, best[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(seen["anchors"][:, :QUERIES], expected)
    encoder_heads = [*model.aids["enc"].bbox_embed.parameters()]
    anchors = seen["anchors"][:, :QUERIES]
    if anchors.requires_grad:  # DETR's anchors are joined to the other queries' learned ones
        grads = torch.autograd.grad(anchors.sum(), encoder_heads, allow_unused=True)
        assert all(g is None for g in grads)  # the anchors are detached from the encoder's boxes
    assert not seen["mask"].gather(1, best).any()  # padded tokens are never selected


@ALL
def test_the_encoder_set_is_scored_in_training_and_absent_at_evaluation(flags):
    model, criterion, _ = build_tiny(**flags)
    images, targets = tiny_batch()
    losses = criterion(model.train()(images, targets=targets), targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    criterion.weighted_total(losses).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    with torch.no_grad():
        assert set(model.eval()(images)) == {"pred_logits", "pred_boxes", "aux_outputs"}


@ALL
def test_an_images_detections_do_not_depend_on_its_batch(flags):
    model = build_tiny(**flags)[0].eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        batched = model(images)
        alone = model([images[1]])  # padded to its own multiple of 32
    torch.testing.assert_close(batched["pred_boxes"][1], alone["pred_boxes"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        batched["pred_logits"][1], alone["pred_logits"][0], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("flags", [DEFORMABLE, MIXED], ids=["deformable", "mixed"])
def test_the_deformable_queries_take_the_selected_boxes_as_references(flags):
    """Deformable DETR's selection gives each query its position and content from its box
    (the detector learns no query rows); DINO's mixed one its position, the content learned."""
    model = build_tiny(**flags)[0].train()
    assert model.transformer.reference_points is None  # no map of its own to make them
    mixed = flags is MIXED
    assert hasattr(model, "query_embed") == mixed
    seen = {}
    original = model.transformer.decode

    def record(queries, *args):
        seen["queries"] = queries
        return original(queries, *args)

    model.transformer.decode = record
    anchors = selection_of(model, tiny_batch()[0])[0]["anchors"]
    queries = seen["queries"][:QUERIES]
    torch.testing.assert_close(queries.reference, anchors[:, :QUERIES])
    aid = model.aids["enc"]
    boxes = queries.reference
    if mixed:
        rows = model.query_embed.weight[:QUERIES]
        torch.testing.assert_close(queries.content[0], model.transformer.learned_queries(rows)[0])
        return
    # cx, cy, w, h in turn, through pos_trans: the first half the position, the second the content
    encoding = torch.cat([sine_encoding(v, HIDDEN // 2) for v in boxes.unbind(-1)], -1)
    position, content = aid.pos_trans_norm(aid.pos_trans(encoding)).chunk(2, -1)
    torch.testing.assert_close(queries.position, position)
    torch.testing.assert_close(queries.content, content)


def test_class_agnostic_proposals_are_matched_and_scored_as_class_0():
    model, criterion, _ = build_tiny(**DEFORMABLE)
    images, targets = tiny_batch()
    enc = model.train()(images, targets=targets)["enc_outputs"]
    plain = {k: v for k, v in enc.items() if k != "class_agnostic"}
    zero = [t | {"labels": torch.zeros_like(t["labels"])} for t in targets]
    assert any(t["labels"].any() for t in targets)  # the batch has other classes
    torch.testing.assert_close(criterion(enc, targets), criterion(plain, zero))
    assert criterion(plain, targets)["loss_ce"] != criterion(enc, targets)["loss_ce"]


def test_mixed_selection_needs_two_stage_on_the_deformable_transformer():
    for argv in (
        ["--mixed_selection", "--transformer", "deformable"],
        ["--mixed_selection", "--two_stage", "--anchor_queries"],
    ):
        with pytest.raises(SystemExit, match="--mixed_selection"):
            options.check_args(options.parse(argv))
    options.check_args(
        options.parse(["--mixed_selection", "--two_stage", "--transformer", "deformable"])
    )


def test_the_deformable_selection_refuses_more_queries_than_tokens():
    model = build_tiny(**DEFORMABLE, num_queries=200)[0].eval()
    with pytest.raises(ValueError, match="200 queries .* tokens"):
        model(tiny_batch()[0])


def test_two_stage_needs_anchor_queries():
    with pytest.raises(SystemExit, match="--anchor_queries"):
        options.check_args(options.parse(["--two_stage"]))
    options.check_args(options.parse(["--two_stage", "--transformer", "deformable"]))
    with pytest.raises(ValueError, match="--anchor_queries"):
        aid = build_tiny(**TWO_STAGE)[0].aids["enc"]
        zeros = torch.zeros(1, 3, 32)
        memory = Memory(torch.zeros(1, 4, 32), torch.zeros(1, 4, dtype=torch.bool), ((2, 2),), (0,))
        aid.select_queries(Queries(zeros, zeros), memory)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [
        TWO_STAGE,
        {**TWO_STAGE, "query_groups": 2, "dn_groups": 2},
        {**DEFORMABLE, "query_groups": 2, "one_to_many_queries": 12, "cls_loss": "focal"},
        {**MIXED, "query_groups": 2, "one_to_many_queries": 12, "cls_loss": "focal"},
    ],
    ids=["alone", "all", "deformable", "mixed"],
)
def test_two_stage_trains_alone_and_with_the_other_aids(flags):
    """60 steps at lr 1e-3: the loss falls by well over a quarter."""
    model, criterion, _ = build_tiny(**flags)
    assert_trains_on_tiny_batch(model, criterion)


def test_reference_boxes_follow_the_queries_through_slicing_and_joining():
    content, boxes = torch.randn(2, 5, 8), torch.rand(2, 5, 4)
    queries = Queries(content, content, boxes)
    joined = Queries.cat([queries[:2], queries[2:]])
    torch.testing.assert_close(joined.reference, boxes)
    with pytest.raises(ValueError, match="reference boxes"):
        Queries.cat([queries[:2], Queries(content[:, 2:], content[:, 2:])])


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("box_refine", [False, True])
def test_the_deformable_decoders_first_boxes_start_as_the_selected_proposals(box_refine, mixed):
    """The box heads' width and height bias is 0 where the queries bring reference boxes (the
    official two-stage): at initialisation the first layer's boxes are the references."""
    flags = {**DEFORMABLE, "box_refine": box_refine, "mixed_selection": mixed}
    model = build_tiny(**flags)[0].train()
    heads = model.bbox_embed if box_refine else [model.bbox_embed]
    assert all(torch.equal(h.layers[-1].bias, torch.zeros(4)) for h in heads)
    images, targets = tiny_batch()
    selected, outputs = selection_of(model, images)
    first = outputs["aux_outputs"][0]["pred_boxes"]
    torch.testing.assert_close(first, selected["anchors"][:, :QUERIES], atol=1e-5, rtol=0)


def test_proposals_outside_the_image_margin_are_never_selected():
    """A proposal with a coordinate outside (0.01, 0.99) proposes nothing (zero features, a
    box at the far corner), as in the reference code, and is never selected."""
    model = build_tiny(**DEFORMABLE)[0].train()
    aid = model.aids["enc"]
    shapes = ((60, 2), (1, 1))  # level 0: the first and last rows' centres are 1/120 from the edge
    cells = 121
    memory = Memory(
        torch.randn(1, cells, 32), torch.zeros(1, cells, dtype=torch.bool), shapes, (0, 120)
    )
    content = torch.zeros(1, 100, 32)
    queries, sets = aid.select_queries(Queries(content, content), memory)
    edge_rows = torch.tensor([0, 1, 118, 119])  # rows 0 and 59 of level 0
    assert (sets["enc_outputs"]["pred_boxes"][0, edge_rows] > 0.999).all()
    inside = ((queries.reference > 0.01) & (queries.reference < 0.99)).all(-1)
    assert inside.all()
    with pytest.raises(ValueError, match="117 tokens that propose"):
        aid.select_queries(Queries(torch.zeros(1, 118, 32), torch.zeros(1, 118, 32)), memory)


def test_the_query_count_is_checked_per_image():
    """An image too small for the queries (a 64 px image has 85 tokens over the tiny model's
    strides 8 to 64) is refused alone and beside a larger image (whose padding tokens would
    otherwise stand in for its missing ones)."""
    model = build_tiny(**DEFORMABLE, num_queries=90)[0].eval()
    small, large = torch.randn(3, 64, 64), torch.randn(3, 256, 256)
    with pytest.raises(ValueError, match="90 queries .* 85 tokens"):
        model([small])
    with pytest.raises(ValueError, match="90 queries .* 85 tokens"):
        model([large, small])
    assert model([large])["pred_boxes"].shape[1] == 90
