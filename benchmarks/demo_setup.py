"""The demo's recipe files (configs/, which the Makefile reads) as flag lists, and the training
switches, for the benchmarks that measure them."""

import shlex
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DEMO_DATA = [f"@{CONFIGS / 'demo_data.txt'}"]
DEMO_PRETRAIN = [f"@{CONFIGS / 'demo_pretrain.txt'}"]  # includes the data flags
DEMO_MODEL = [f"@{CONFIGS / 'demo_model.txt'}"]
# The demo's optimisation less --epochs, --lr_drop and --render (the benchmarks set the length).
DEMO_TRAINING = [f"@{CONFIGS / 'demo_training.txt'}"]
DEMO_BACKBONE = "outputs/demo_detr/backbone.pth"  # what `make demo-detr` pretrains

# Deformable DETR trained end to end from scratch (configs/deformable.txt), without the demo's
# pretrained backbone.
DEFORMABLE = [f"@{CONFIGS / 'deformable.txt'}", "--pretrained_backbone", ""]
# Deformable DETR's sigmoid focal classification with its loss weight and matching cost.
FOCAL = ["--cls_loss", "focal", "--cls_loss_coef", "2", "--set_cost_class", "2"]
# DINO's mixed query selection, and its contrastive denoising: 5 groups (the demo's images have
# at most 3 objects: 30 queries), box noise 1.0 (DINO's COCO configuration: 0.4), labels
# flipped with probability 0.25 (DINO's label_noise_ratio 0.5).
MIXED = ["--two_stage", "--mixed_selection"]
CDN = ["--dn_groups", "5", "--dn_box_noise", "1.0", "--dn_label_noise", "0.25"]
# Twice the demo's LR, for the transformer and the backbone alike.
LR2 = ["--lr", "2e-4", "--lr_backbone", "2e-4"]
# H-DETR's one-to-many branch: its K of 6, and 3 times the matching queries (the demo's images
# have at most 3 objects, 18 repeated targets).
HYBRID = ["--one_to_many_queries", "30", "--one_to_many_k", "6"]

# The switches measured, as main.py flags: each alone (denoising needs anchor queries) and all
# together, on the demo's DETR (its frozen pretrained backbone) and on Deformable DETR from
# scratch. 5 denoising groups is DN-DETR's COCO setting; Group DETR uses 11 groups on COCO, but
# with the demo's frozen backbone the decoder is most of a step and 11 groups cost 3.8 vanilla
# steps (benchmarks/switch_cost.py), so a 10-minute budget measures 3.
SWITCHES = {
    "vanilla": [],
    "groups": ["--query_groups", "3"],
    "anchors": ["--anchor_queries"],
    "anchors+dn": ["--anchor_queries", "--dn_groups", "5"],
    "all": ["--query_groups", "3", "--anchor_queries", "--dn_groups", "5"],
    "focal": FOCAL,
    "hybrid": HYBRID,
    "two-stage": ["--anchor_queries", "--two_stage"],
    "deformable": DEFORMABLE,
    "deformable+focal": [*DEFORMABLE, *FOCAL],
    "deformable+hybrid": [*DEFORMABLE, *HYBRID],
    "deformable+two-stage": [*DEFORMABLE, "--two_stage"],
    "deformable+mixed-selection": [*DEFORMABLE, "--two_stage", "--mixed_selection"],
    # DINO's pieces on Deformable DETR with focal classification, added one by one (each needs
    # the one before: positions from the boxes need the selected boxes, contrastive denoising the
    # positions), look-forward-twice alone, and all of them (configs/dino.txt's model).
    "dino-mixed": [*DEFORMABLE, *FOCAL, *MIXED],
    "dino-positions": [*DEFORMABLE, *FOCAL, *MIXED, "--query_pos_from_boxes"],
    "dino-dn": [*DEFORMABLE, *FOCAL, *MIXED, "--query_pos_from_boxes", *CDN],
    "dino-lft": [*DEFORMABLE, *FOCAL, "--look_forward_twice"],
    "dino": [*DEFORMABLE, *FOCAL, *MIXED, "--query_pos_from_boxes", *CDN, "--look_forward_twice"],
    # The demo's optimisation varied on Deformable DETR with focal classification: twice and four
    # times the LR (backbone included), no warm-up, 30 queries; and DINO at twice the LR.
    "focal-lr2e-4": [*DEFORMABLE, *FOCAL, *LR2],
    "focal-lr4e-4": [*DEFORMABLE, *FOCAL, "--lr", "4e-4", "--lr_backbone", "4e-4"],
    "focal-warm0": [*DEFORMABLE, *FOCAL, "--warmup_iters", "0"],
    "focal-q30": [*DEFORMABLE, *FOCAL, "--num_queries", "30"],
    "dino-lr2e-4": [
        *DEFORMABLE,
        *FOCAL,
        *MIXED,
        "--query_pos_from_boxes",
        *CDN,
        "--look_forward_twice",
        *LR2,
    ],
}


def shown(flags: list[str]) -> str:
    """``flags`` as a command line would give them, the recipe files relative to the
    repository."""
    return shlex.join(flags).replace(f"{CONFIGS.parent}/", "")
