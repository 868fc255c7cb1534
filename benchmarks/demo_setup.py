"""The demo's configuration (the Makefile's DEMO_DATA, DEMO_PRETRAIN, DEMO_MODEL, DEMO_DETR) and
the training switches, for the benchmarks that measure them. Keep it in step with the Makefile.
"""

DEMO_DATA = [
    "--dataset_file", "shapes", "--coco_path", "data/shapes_demo", "--shapes_train", "4000",
    "--shapes_val", "200", "--shapes_size", "64", "--shapes_classes", "3",
    "--shapes_min_objects", "1", "--shapes_max_objects", "3", "--shapes_min_scale", "0.2",
    "--shapes_max_scale", "0.5", "--scales", "64", "--max_size", "64", "--eval_size", "64",
]  # fmt: skip
DEMO_PRETRAIN = ["--backbone", "pvt_tiny", "--stage", "3", "--iters", "1800", "--batch_size", "16",
                 "--lr", "1e-4"]  # fmt: skip
DEMO_MODEL = [
    "--backbone", "pvt_tiny", "--feature_stage", "3", "--hidden_dim", "256", "--enc_layers", "2",
    "--dec_layers", "3", "--num_queries", "10", "--batch_size", "8", "--num_workers", "1",
]  # fmt: skip
# DEMO_DETR less --epochs, --lr_drop and --render (the benchmarks set the length of training).
DEMO_TRAINING = ["--dropout", "0", "--drop_path", "0", "--lr", "1e-4", "--lr_backbone", "0",
                 "--warmup_iters", "100"]  # fmt: skip
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
