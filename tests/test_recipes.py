"""Recipe files (``@file`` flags, options.RecipeParser) and the demo's recipes in configs/."""

import pytest

import options
from models import build_model
from tests.conftest import REPO


def test_a_recipe_reads_several_flags_a_line_comments_and_later_flags_override(tmp_path):
    recipe = tmp_path / "recipe.txt"
    recipe.write_text("# a comment line\n--epochs 3 --lr 2e-4  # the schedule\n--num_queries 7\n")
    args = options.parse([f"@{recipe}", "--lr", "5e-4"])
    assert (args.epochs, args.lr, args.num_queries) == (3, 5e-4, 7)


def test_an_empty_pretrained_backbone_overrides_a_recipes_backbone(tmp_path):
    recipe = tmp_path / "recipe.txt"
    recipe.write_text("--pretrained_backbone outputs/demo_detr/backbone.pth\n")
    assert options.parse([f"@{recipe}"]).pretrained_backbone == "outputs/demo_detr/backbone.pth"
    assert options.parse([f"@{recipe}", "--pretrained_backbone", ""]).pretrained_backbone is None


def test_the_demo_trains_dino_from_scratch_and_demo_detr_trains_detr(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name each other relative to the repository
    demo = options.parse(["@configs/demo.txt"])
    assert (demo.transformer, demo.box_refine, demo.num_feature_levels) == ("deformable", True, 4)
    assert (demo.two_stage, demo.query_pos_from_boxes, demo.dn_groups) == (True, True, 5)
    assert demo.pretrained_backbone is None and demo.lr_backbone == demo.lr == 2e-4
    assert (demo.epochs, demo.lr_drop) == (4, 3)
    detr = options.parse(["@configs/demo_detr.txt"])
    assert (detr.transformer, detr.lr_backbone, detr.epochs) == ("detr", 0.0, 10)
    for args in (demo, detr):
        assert (args.backbone, args.enc_layers, args.dec_layers, args.num_queries) == (
            "pvt_tiny",
            2,
            3,
            10,
        )
        options.check_args(args)


def test_the_demos_dino_recipe_builds_dinos_decoder_on_the_demo_model(monkeypatch):
    monkeypatch.chdir(REPO)
    args = options.parse(
        ["@configs/demo_data.txt", "@configs/demo_model.txt", "@configs/demo_training.txt",
         "@configs/dino.txt", "--num_classes", "4"]
    )  # fmt: skip
    options.check_args(args)
    model = build_model(args)[0]
    assert {"enc", "dn"} <= set(model.aids) and model.aids["dn"].contrastive
    assert model.transformer.decoder.ref_point_head is not None
    assert model.transformer.decoder.look_forward_twice


COCO_RECIPES = {
    "coco_pvt_small_detr": ("detr", 100, "softmax", False, False, (50, 33, 1e-4, 2)),
    "coco_pvt_small_deformable": ("deformable", 300, "focal", False, False, (50, 40, 2e-4, 4)),
    "coco_pvt_small_deformable_refine": (
        "deformable", 300, "focal", True, False, (50, 40, 2e-4, 4)
    ),
    "coco_pvt_small_deformable_two_stage": (
        "deformable", 300, "focal", True, True, (50, 40, 2e-4, 4)
    ),
    "coco_pvt_small_dino": ("deformable", 900, "focal", True, True, (12, 11, 1e-4, 2)),
    "coco_pvt_small_dino_24ep": ("deformable", 900, "focal", True, True, (24, 20, 1e-4, 2)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(COCO_RECIPES))
def test_each_coco_recipe_parses_and_builds_its_model(monkeypatch, name):
    monkeypatch.chdir(REPO)
    args = options.parse([f"@configs/{name}.txt", "--pretrained_backbone", ""])
    transformer, queries, cls_loss, refine, two_stage, schedule = COCO_RECIPES[name]
    assert (args.dataset_file, args.coco_path, args.backbone) == ("coco", "data/coco", "pvt_small")
    assert (args.transformer, args.num_queries, args.cls_loss) == (transformer, queries, cls_loss)
    assert (args.box_refine, args.two_stage) == (refine, two_stage)
    assert (args.epochs, args.lr_drop, args.lr, args.batch_size) == schedule
    assert args.lr_linear_proj_mult == (0.1 if transformer == "deformable" else 1.0)
    model, criterion, _ = build_model(args)
    assert model.num_queries == queries and model.num_classes == 91
    assert ("enc" in model.aids) == two_stage
    dino = name.startswith("coco_pvt_small_dino")
    assert ("dn" in model.aids) == dino and args.query_pos_from_boxes == dino
    if dino:
        assert (args.mixed_selection, args.look_forward_twice, args.dropout) == (True, True, 0.0)
        assert (args.dn_groups, args.dn_max_queries, args.dn_box_noise) == (100, 100, 0.4)
