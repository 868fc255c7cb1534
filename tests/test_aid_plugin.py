"""The plug-in contract of the training aids: an aid written in one file (here, this test file)
and listed in ``models.aids.AIDS`` gets its flags on main.py's command line, adds training-only
queries with their own targets, known query-target pairs, weight and isolated attention groups,
trains through main.py on both transformers beside the other aids, is saved with its flags and
rebuilt from the checkpoint alone, and runs no query at evaluation; no other file of the
repository changes."""

import argparse
import json
import math

import pytest
import torch
from torch import Tensor, nn

import models.aids
import options
from models.aids.base import Aid, DetectorSpec, Queries, QueryBlock, self_attention_mask
from tests.conftest import (
    HIDDEN,
    NUM_CLASSES,
    QUERIES,
    build_tiny,
    run_main,
    tiny_argv,
    tiny_batch,
)

SHIFT = 0.1  # the toy targets' boxes move right by this fraction of the image width


def shifted_subset(targets: list[dict[str, Tensor]], count: int) -> list[dict[str, Tensor]]:
    """Each image's first ``count`` objects, their boxes (normalized cxcywh) moved right by
    ``SHIFT`` or as far as the image's right edge allows."""
    out = []
    for t in targets:
        boxes = t["boxes"][:count].clone()
        boxes[:, 0] = torch.minimum(boxes[:, 0] + SHIFT, 1 - boxes[:, 2] / 2)
        out.append(t | {"labels": t["labels"][:count], "boxes": boxes})
    return out


def known_pairs(objects: int, count: int, groups: int, device) -> tuple[Tensor, Tensor]:
    """(query indices, target indices): query j of every group answers target j."""
    queries = torch.arange(objects, device=device)
    return (
        torch.cat([g * count + queries for g in range(groups)]),
        queries.repeat(groups),
    )


class ShiftedCopies(Aid):
    """Training-only copies of the matching queries, in groups that do not see each other.

    Each of ``groups`` groups holds the ``num_queries`` matching queries with a learned content
    offset per query; query j of every group answers object j of its image moved right
    (:func:`shifted_subset`), a known pair that needs no matching; the block's terms weigh
    ``weight``.
    """

    name = "toy"

    def __init__(self, groups: int, weight: float, num_queries: int, d_model: int):
        super().__init__()
        self.groups = groups
        self.weight = weight
        self.offsets = nn.Embedding(groups * num_queries, d_model)

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--toy_groups", default=0, type=int, help="groups of copies (0: off)")
        group.add_argument("--toy_weight", default=0.5, type=float, help="weight of their loss")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.toy_groups > 0

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        if args.toy_groups < 0 or args.toy_weight <= 0:
            raise ValueError(
                f"--toy_groups {args.toy_groups}, --toy_weight {args.toy_weight}: pass 0 or "
                "more groups (0: off) and a weight above 0"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "ShiftedCopies":
        return cls(args.toy_groups, args.toy_weight, spec.num_queries, spec.hidden_dim)

    def training_blocks(
        self, pool: Queries, num_queries: int, targets: list[dict[str, Tensor]] | None
    ) -> list[QueryBlock]:
        if targets is None:
            raise ValueError("the toy queries answer the targets: pass targets=")
        copies = Queries.cat([pool[:num_queries]] * self.groups)
        queries = Queries(copies.content + self.offsets.weight, copies.position, copies.reference)
        own = shifted_subset(targets, num_queries)
        device = pool.content.device
        indices = [known_pairs(len(t["labels"]), num_queries, self.groups, device) for t in own]
        block = QueryBlock(
            self.name, queries, attention_groups=self.groups, indices=indices, targets=own,
            loss_weight=self.weight,
        )  # fmt: skip
        return [block]


# An aid whose class has no docstring: its flag group is described by its name.
class Undocumented(Aid):
    name = "undocumented"

    @classmethod
    def add_args(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--undocumented", default=0, type=int)

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.undocumented > 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, spec: DetectorSpec) -> "Undocumented":
        return cls()


GROUPS, WEIGHT = 3, 0.5
TOY = {"toy_groups": GROUPS, "toy_weight": WEIGHT, "dropout": 0.0, "drop_path": 0.0}
DEFORMABLE = {"transformer": "deformable"}
SETS = ("pred_logits", "pred_boxes")


def list_aid(monkeypatch, aid: type[Aid]) -> None:
    """``aid`` listed after the others, as a new entry of ``models.aids.AIDS`` is."""
    monkeypatch.setattr(models.aids, "AIDS", (*models.aids.AIDS, aid))


@pytest.fixture
def with_toy_aid(monkeypatch):
    list_aid(monkeypatch, ShiftedCopies)


# --- flags --------------------------------------------------------------------------------------


def test_an_aid_declares_its_flags_and_its_checks(with_toy_aid):
    args = options.parse(["--toy_groups", "3", "--toy_weight", "0.25"])
    assert (args.toy_groups, args.toy_weight) == (3, 0.25)
    assert {"toy_groups", "toy_weight"} <= set(options.checkpoint_flags())
    with pytest.raises(SystemExit, match="--toy_groups -1"):
        options.check_args(options.parse(["--toy_groups", "-1"]))


def test_an_aid_without_a_docstring_is_listed_under_its_name(monkeypatch, capsys):
    assert Undocumented.__doc__ is None
    list_aid(monkeypatch, Undocumented)
    assert options.parse(["--undocumented", "2"]).undocumented == 2
    with pytest.raises(SystemExit):
        options.parse(["--help"])
    assert "aid: undocumented:\n  undocumented\n" in capsys.readouterr().out
    model = build_tiny(undocumented=1)[0]
    assert isinstance(model.aids["undocumented"], Undocumented)


# --- the block ----------------------------------------------------------------------------------


def test_the_block_carries_its_targets_known_pairs_weight_and_groups():
    aid = ShiftedCopies(GROUPS, WEIGHT, num_queries=2, d_model=HIDDEN)
    three = torch.tensor([[0.2, 0.5, 0.2, 0.2], [0.85, 0.5, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]])
    targets = tiny_batch()[1] + [  # three objects, one more than the 2 queries of a group
        {"labels": torch.tensor([2, 0, 1]), "boxes": three},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    pool = Queries(torch.randn(4, 7, HIDDEN), torch.randn(4, 7, HIDDEN))
    (block,) = aid.training_blocks(pool, 2, targets)
    assert len(block.queries) == GROUPS * 2 and block.attention_groups == GROUPS
    assert block.loss_weight == WEIGHT and not block.sees_matching
    torch.testing.assert_close(block.queries.position, pool.position[:, :2].repeat(1, GROUPS, 1))
    for given, own, (queries, answered) in zip(targets, block.targets, block.indices, strict=True):
        kept = min(len(given["labels"]), 2)
        assert torch.equal(own["labels"], given["labels"][:kept])
        moved = own["boxes"] - given["boxes"][:kept]
        assert (moved[:, 1:] == 0).all() and (moved[:, 0] > 0).all()
        assert (own["boxes"][:, 0] + own["boxes"][:, 2] / 2 <= 1 + 1e-6).all()  # inside
        assert queries.tolist() == [g * 2 + j for g in range(GROUPS) for j in range(kept)]
        assert answered.tolist() == list(range(kept)) * GROUPS
    # right by SHIFT, or up to the right edge (the box of width 0.2 at cx 0.85 stops at 0.9)
    torch.testing.assert_close(block.targets[2]["boxes"][:, 0], torch.tensor([0.3, 0.9]))


def test_the_blocks_self_attention_mask_isolates_its_groups():
    aid = ShiftedCopies(GROUPS, WEIGHT, num_queries=QUERIES, d_model=HIDDEN)
    pool = Queries(torch.randn(2, QUERIES, HIDDEN), torch.randn(2, QUERIES, HIDDEN))
    blocks = aid.training_blocks(pool, QUERIES, tiny_batch()[1])
    mask = self_attention_mask(QUERIES, blocks, torch.device("cpu"))
    group = torch.tensor([-1] * QUERIES + [g for g in range(GROUPS) for _ in range(QUERIES)])
    assert torch.equal(mask, group[:, None] != group[None, :])  # True: may not attend


@pytest.mark.parametrize("switches", [{}, DEFORMABLE], ids=["detr", "deformable"])
def test_in_the_decoder_a_group_sees_neither_the_other_groups_nor_the_matching_queries(
    with_toy_aid, switches
):
    model = build_tiny(**TOY, **switches)[0].train()
    images, targets = tiny_batch()
    with torch.no_grad():
        before = model(images, targets=targets)
        model.aids["toy"].offsets.weight[QUERIES : 2 * QUERIES] += 1.0  # group 1's queries
        after = model(images, targets=targets)
    toy_before, toy_after = before["toy_outputs"], after["toy_outputs"]
    for key in SETS:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
        for g in (0, 2):
            part = slice(g * QUERIES, (g + 1) * QUERIES)
            torch.testing.assert_close(
                toy_after[key][:, part], toy_before[key][:, part], atol=1e-6, rtol=0
            )
    # (the logits: the deformable box head starts at zero, its boxes are the reference points)
    group_1 = slice(QUERIES, 2 * QUERIES)
    change = toy_after["pred_logits"][:, group_1] - toy_before["pred_logits"][:, group_1]
    assert change.abs().max() > 1e-3


@pytest.mark.parametrize("switches", [{}, DEFORMABLE], ids=["detr", "deformable"])
def test_the_criterion_scores_the_toy_set_on_its_targets_and_pairs_at_its_weight(
    with_toy_aid, switches
):
    model, criterion, _ = build_tiny(**TOY, **switches)
    images, targets = tiny_batch()
    outputs = model.train()(images, targets=targets)
    toy = outputs["toy_outputs"]
    assert toy["pred_logits"].shape[1] == GROUPS * QUERIES and toy["loss_weight"] == WEIGHT
    for own, expected in zip(toy["targets"], shifted_subset(targets, QUERIES), strict=True):
        assert torch.equal(own["boxes"], expected["boxes"])
    losses = criterion(outputs, targets)
    # the L1 box loss over the known pairs, on the shifted boxes, per pair, times the weight
    l1 = sum(
        (toy["pred_boxes"][i, queries] - own["boxes"][answered]).abs().sum()
        for i, (own, (queries, answered)) in enumerate(
            zip(toy["targets"], toy["indices"], strict=True)
        )
    )
    pairs = sum(len(queries) for queries, _ in toy["indices"])
    assert pairs == GROUPS * 3  # the tiny batch's 1 + 2 objects, answered by every group
    torch.testing.assert_close(losses["loss_bbox_toy"], WEIGHT * l1 / pairs)
    unweighted = criterion({k: toy[k] for k in (*SETS, "indices", "targets")}, targets)
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        assert math.isfinite(losses[f"{term}_toy"].item())
        torch.testing.assert_close(losses[f"{term}_toy"], WEIGHT * unweighted[term])
    model.eval()
    with torch.no_grad():
        evaluated = model(images)
    assert evaluated["pred_logits"].shape[1] == QUERIES
    assert not [key for key in evaluated if key.endswith("_outputs") and key != "aux_outputs"]


# --- end to end ---------------------------------------------------------------------------------

BESIDE = {  # the toy aid beside every aid that combines with each transformer
    "detr": ["--query_groups", "2", "--one_to_many_queries", "4", "--one_to_many_k", "2",
             "--anchor_queries", "--dn_groups", "2"],
    "deformable": ["--transformer", "deformable", "--query_groups", "2",
                   "--one_to_many_queries", "4", "--one_to_many_k", "2", "--two_stage"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("transformer", BESIDE)
def test_the_aid_trains_through_main_beside_the_others_and_its_checkpoint_rebuilds_it(
    with_toy_aid, tmp_path, transformer
):
    data, out = tmp_path / "data", tmp_path / "run"
    toy = ["--toy_groups", str(GROUPS), "--toy_weight", str(WEIGHT)]
    run_main(tiny_argv(data, out, "--epochs", "1", *BESIDE[transformer], *toy))
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    for key in ("train_loss_ce_toy", "train_loss_giou_toy", "train_loss_bbox_toy_0",
                "train_loss_ce_dn" if transformer == "detr" else "train_loss_ce_enc",
                "train_loss_ce_one_to_many", "train_loss_ce_group_0", "test_coco_AP"):  # fmt: skip
        assert math.isfinite(record[key]), key
    assert not [key for key in record if key.startswith("test_") and "toy" in key]
    saved = json.loads((out / "args.json").read_text())
    assert (saved["toy_groups"], saved["toy_weight"]) == (GROUPS, WEIGHT)

    model, _, args = options.rebuild_model(str(out / "checkpoint.pth"))
    assert (args.toy_groups, args.toy_weight) == (GROUPS, WEIGHT)
    aid = model.aids["toy"]
    assert isinstance(aid, ShiftedCopies) and aid.weight == WEIGHT and aid.groups == GROUPS
    assert aid.offsets.weight.shape == (GROUPS * QUERIES, HIDDEN)
    with torch.no_grad():
        outputs = model([torch.zeros(3, 64, 64)])
    assert outputs["pred_logits"].shape == (1, QUERIES, NUM_CLASSES + 1)
    assert not [key for key in outputs if key.endswith("_outputs") and key != "aux_outputs"]

    evaluation = tmp_path / "eval"  # the data flags alone: the aid comes from the checkpoint
    data_flags = tiny_argv(data, evaluation)[: tiny_argv(data, evaluation).index("--backbone")]
    run_main([*data_flags, "--eval", "--resume", str(out / "checkpoint.pth"), "--num_workers", "0",
              "--output_dir", str(evaluation)])  # fmt: skip
    log = (evaluation / "out.log").read_text()
    assert f"--toy_groups {GROUPS}: taken from" in log and "coco_AP50" in log
