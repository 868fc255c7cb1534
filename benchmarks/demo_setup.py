"""The demo's recipe files (configs/, which the Makefile reads) as flag lists, and the training
switches, for the benchmarks that measure them."""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

DEMO_DATA = [f"@{CONFIGS / 'demo_data.txt'}"]
DEMO_PRETRAIN = [f"@{CONFIGS / 'demo_pretrain.txt'}"]  # includes the data flags
DEMO_MODEL = [f"@{CONFIGS / 'demo_model.txt'}"]
# The demo's optimisation less --epochs, --lr_drop and --render (the benchmarks set the length).
DEMO_TRAINING = [f"@{CONFIGS / 'demo_training.txt'}"]
DEMO_BACKBONE = "outputs/demo/backbone.pth"  # what `make demo` pretrains

# The switches measured, as main.py flags: each alone (denoising needs anchor queries) and all
# together. 5 denoising groups is DN-DETR's COCO setting; Group DETR uses 11 groups on COCO, but
# with the demo's frozen backbone the decoder is most of a step and 11 groups cost 3.8 vanilla
# steps (benchmarks/switch_cost.py), so a 10-minute budget measures 3.
SWITCHES = {
    "vanilla": [],
    "groups": ["--query_groups", "3"],
    "anchors": ["--anchor_queries"],
    "anchors+dn": ["--anchor_queries", "--dn_groups", "5"],
    "all": ["--query_groups", "3", "--anchor_queries", "--dn_groups", "5"],
}
