"""export.py: the ONNX file computes what the eval-mode model computes, at sizes and batch sizes
that the export did not see (any height and width, odd ones and padded batches of mixed sizes
included), for DETR and Deformable DETR, PVT and ResNet-50 backbones, with the training aids
switched on and with post-processing; a checkpoint written by main.py exports end to end;
predict.py --onnx gives the checkpoint's detections, JSON and drawings; mistakes are one line.

Agreement is fp32 agreement: max |onnxruntime - eager| <= 1e-4 * max(1, max |eager|). Exports
take tens of seconds each, so every test that exports is slow, and each exported file is shared
by the tests of its module-scoped fixture.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
import options
import predict
from models import build_model
from models.postprocess import PostProcess
from models.pvt import Stage, sampled_pos_embed
from tests.conftest import (
    NUM_CLASSES,
    QUERIES,
    TINY_MODEL_FLAGS,
    run_main,
    save_checkpoint,
    tiny_argv,
)
from util.errors import cli
from util.misc import pad_images, pad_to_multiple

# The training aids exported in evaluation mode (their training-only queries are not exported).
AID_FLAGS = [
    ["--query_groups", "2"],
    ["--anchor_queries"],
    ["--anchor_queries", "--dn_groups", "2"],
]
TOLERANCE = 1e-4
DEFORMABLE_FLAGS = ["--transformer", "deformable", "--box_refine", "--two_stage",
                    "--cls_loss", "focal"]  # fmt: skip
# Batches of sizes that the export did not see, each padded to its largest image: multiples of
# 32, sizes that are not (odd ones too), smaller than a 32 x 32 cell, and mixed batches.
NEW_SIZES = [
    [(160, 224)],
    [(32, 32)],
    [(72, 88)],
    [(65, 97)],
    [(17, 23)],
    [(224, 96), (100, 130), (64, 64)],
    [(101, 133), (64, 70), (33, 47)],
]
# An untrained two-stage selection scores two tokens of a 32 x 32 image equally, and the two
# runtimes order the tie differently (the same boxes, for other queries).
DEFORMABLE_SIZES = [sizes for sizes in NEW_SIZES if sizes != [(32, 32)]]


def assert_agrees(onnx: dict[str, torch.Tensor], eager: dict[str, torch.Tensor]) -> None:
    """Same names, shapes and dtypes; labels equal, floats within TOLERANCE of their scale."""
    assert onnx.keys() == eager.keys()
    for name, expected in eager.items():
        got = onnx[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        if expected.dtype == torch.int64:
            assert torch.equal(got, expected), name
        else:
            scale = max(1.0, expected.abs().max().item())
            assert (got - expected).abs().max().item() <= TOLERANCE * scale, name


def export_args(checkpoint: Path, output: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[export.get_args_parser()])
    return parser.parse_args(["--resume", str(checkpoint), "--output", str(output), *extra])


def tiny_checkpoint(path: Path, flags: list[str], seed: int = 0) -> Path:
    """A checkpoint of the tiny detector with main.py's ``flags`` on top of the tiny ones."""
    args = vars(options.parse([*TINY_MODEL_FLAGS, *flags])) | {"num_classes": NUM_CLASSES}
    args = argparse.Namespace(**args)
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(args)[0], args)
    return path


class Exported:
    """An exported checkpoint: the checkpoint and the file, the eager model (rebuilt from the
    checkpoint, as export.py does) and the file's onnxruntime session."""

    def __init__(self, checkpoint: Path, output: Path, *extra: str):
        export.main(export_args(checkpoint, output, *extra))
        self.checkpoint, self.path = checkpoint, output
        self.model = export.load_detector(str(checkpoint))
        self.session = export.onnx_session(output)
        self.postprocess = "--postprocess" in extra

    def compare(self, sizes: list[tuple[int, int]], seed: int = 1) -> dict[str, torch.Tensor]:
        """Run both on a padded batch of ``sizes``; assert they agree; return onnxruntime's."""
        inputs = export.padded_batch(sizes, seed, self.postprocess)
        onnx = export.run_onnx(self.session, inputs)
        assert_agrees(onnx, export.run_torch(self.model, inputs, self.postprocess))
        return onnx


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The checkpoint of a one-epoch main.py run of the tiny detector."""
    tmp = tmp_path_factory.mktemp("export")
    run_main(tiny_argv(tmp / "data", tmp / "run", "--epochs", "1"))
    return tmp / "run" / "checkpoint.pth"


@pytest.fixture(scope="module")
def pvt(trained) -> Exported:
    """The main.py checkpoint exported by export.py, --check included."""
    return Exported(trained, trained.parent / "model.onnx", "--check")


@pytest.fixture(scope="module")
def postprocessed(trained) -> Exported:
    """The main.py checkpoint exported with --postprocess."""
    return Exported(trained, trained.parent / "postprocess.onnx", "--postprocess")


@pytest.fixture(scope="module")
def deformable(tmp_path_factory) -> Exported:
    """Deformable DETR (every level's size symbolic: the extra level's too) with box
    refinement, two-stage selection and focal classification, exported with --check."""
    tmp = tmp_path_factory.mktemp("deformable")
    checkpoint = tiny_checkpoint(tmp / "deformable.pth", DEFORMABLE_FLAGS)
    return Exported(checkpoint, tmp / "deformable.onnx", "--check")


def assert_alone(exported: Exported, sizes: list[tuple[int, int]], seed: int) -> None:
    """A batch of ``sizes`` padded to its largest image gives each image, in onnxruntime, what
    the eager model gives it alone (a list of one image, padded to a multiple of 32 there)."""
    images, mask = export.padded_batch(sizes, seed)
    outputs = export.run_onnx(exported.session, (images, mask))
    for i, (h, w) in enumerate(sizes):
        with torch.no_grad():
            alone = exported.model([images[i, :, :h, :w]])
        expected = {name: alone[name] for name in export.OUTPUTS}
        assert_agrees({name: v[i : i + 1] for name, v in outputs.items()}, expected)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", NEW_SIZES, ids=str)
def test_onnxruntime_agrees_with_eager_on_new_sizes(pvt, sizes):
    outputs = pvt.compare(sizes)
    assert outputs["pred_logits"].shape == (len(sizes), QUERIES, NUM_CLASSES + 1)


@pytest.mark.slow
def test_the_file_takes_any_size_by_name_and_holds_the_runs_flags(pvt):
    inputs = {i.name: i.shape for i in pvt.session.get_inputs()}
    assert inputs == {
        "images": ["batch", 3, "height", "width"],
        "mask": ["batch", "height", "width"],
    }
    flags = json.loads(pvt.session.get_modelmeta().custom_metadata_map[export.FLAGS_KEY])
    assert flags["eval_size"] == 64 and flags["num_classes"] == NUM_CLASSES


@pytest.mark.slow
def test_each_image_of_a_padded_batch_detects_as_alone(pvt):
    assert_alone(pvt, [(101, 133), (64, 70), (65, 97)], seed=2)


@pytest.mark.slow
def test_a_batch_padded_to_32_detects_as_padded_to_its_largest_image(pvt):
    """The graph pads to a multiple of 32 itself: padding beforehand changes nothing."""
    sizes = [(72, 88), (65, 97)]
    largest = export.run_onnx(pvt.session, export.padded_batch(sizes, seed=4))
    padded = export.run_onnx(pvt.session, export.padded_batch(sizes, seed=4, multiple=32))
    assert_agrees(padded, largest)


@pytest.mark.slow
def test_postprocess_outputs_equal_postprocess(postprocessed):
    sizes = [(160, 224), (101, 133), (65, 97)]
    images, mask, orig_sizes = export.padded_batch(sizes, seed=3, postprocess=True)
    onnx = export.run_onnx(postprocessed.session, (images, mask, orig_sizes))
    with torch.no_grad():
        padded = pad_to_multiple(images, mask, 32)
        detections = PostProcess()(postprocessed.model(*padded), orig_sizes)
    expected = {k: torch.stack([d[k] for d in detections]) for k in export.POSTPROCESS_OUTPUTS}
    assert_agrees(onnx, expected)
    assert onnx["boxes"].amax().item() > 1.0  # pixels, not normalized coordinates


@pytest.mark.slow
def test_a_resnet50_detector_exports(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "resnet.pth", ["--backbone", "resnet50",
                                                           "--feature_stage", "4"])  # fmt: skip
    exported = Exported(checkpoint, tmp_path / "resnet.onnx")
    exported.compare([(64, 96)])
    exported.compare([(65, 97), (40, 50)])
    assert_alone(exported, [(72, 88), (40, 50)], seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("flags", AID_FLAGS, ids=" ".join)
def test_a_detector_trained_with_aids_exports_its_inference_queries(tmp_path, flags):
    exported = Exported(tiny_checkpoint(tmp_path / "aids.pth", flags), tmp_path / "aids.onnx")
    outputs = exported.compare([(72, 88), (97, 65)])
    assert outputs["pred_boxes"].shape == (2, QUERIES, 4)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", DEFORMABLE_SIZES, ids=str)
def test_a_deformable_detector_agrees_with_eager_on_new_sizes(deformable, sizes):
    """Odd maps at every level (160 x 224: 5 x 7 at stride 32, 3 x 4 at stride 64)."""
    outputs = deformable.compare(sizes)
    assert outputs["pred_boxes"].shape == (len(sizes), QUERIES, 4)


@pytest.mark.slow
def test_each_image_of_a_padded_batch_detects_as_alone_in_deformable_detr(deformable):
    assert_alone(deformable, [(101, 133), (64, 70), (65, 97)], seed=2)


# predict.py --onnx: the exported file, from the command line.


@pytest.fixture(scope="module")
def photos(trained) -> Path:
    """The run's validation images and two crops whose model inputs are not multiples of 32."""
    folder = trained.parent.parent / "photos"
    folder.mkdir()
    for path in sorted((trained.parent.parent / "data" / "val2017").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    first = Image.open(sorted(folder.iterdir())[0])
    first.crop((0, 0, 50, 37)).save(folder / "crop.png")
    first.crop((3, 5, 64, 64)).resize((97, 89)).save(folder / "odd.png")
    return folder


def predict_run(photos: Path, out: Path, *source: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """predict.py on ``photos`` (batches of two, every detection kept, drawn): its JSON records
    and drawings by file name."""
    out.mkdir()
    argv = [
        str(photos), *source, "--json", str(out / "predictions.json"), "--render", str(out),
        "--score_threshold", "0", "--batch_size", "2", "--num_workers", "0",
    ]  # fmt: skip
    parser = argparse.ArgumentParser(parents=[predict.get_args_parser()])
    assert predict.main(parser.parse_args(argv)) == []
    records = json.loads((out / "predictions.json").read_text())
    return records, {p.name: np.asarray(Image.open(p)) for p in out.glob("*.png")}


def assert_same_predictions(onnx: tuple, eager: tuple) -> None:
    """The same records to the JSON's rounding (scores 4 decimals, boxes 2), in the same order;
    drawings of the same size that differ in at most 1% of their pixels (a rounded box edge or
    caption)."""
    (records, drawings), (expected_records, expected_drawings) = onnx, eager
    assert len(records) == len(expected_records) == QUERIES * 6
    for got, expected in zip(records, expected_records, strict=True):
        assert {k: got[k] for k in ("file_name", "category_id", "category_name")} == {
            k: expected[k] for k in ("file_name", "category_id", "category_name")
        }
        assert abs(got["score"] - expected["score"]) <= 2e-4
        assert np.allclose(got["bbox"], expected["bbox"], rtol=0, atol=0.02)
    assert drawings.keys() == expected_drawings.keys() and len(drawings) == 6
    for name, drawn in drawings.items():
        assert drawn.shape == expected_drawings[name].shape, name
        assert (drawn != expected_drawings[name]).any(-1).mean() <= 0.01, name


@pytest.mark.slow
def test_predict_with_onnx_gives_the_checkpoints_json_and_drawings(pvt, photos, tmp_path):
    eager = predict_run(photos, tmp_path / "eager", "--resume", str(pvt.checkpoint))
    onnx = predict_run(photos, tmp_path / "onnx", "--onnx", str(pvt.path))
    assert_same_predictions(onnx, eager)


@pytest.mark.slow
def test_predict_with_a_postprocessed_onnx_gives_the_checkpoints_json(
    postprocessed, photos, tmp_path
):
    eager = predict_run(photos, tmp_path / "eager", "--resume", str(postprocessed.checkpoint))
    onnx = predict_run(photos, tmp_path / "onnx", "--onnx", str(postprocessed.path))
    assert_same_predictions(onnx, eager)


# Without an export: the graph's padding and the rewrite that make the PVT exportable, and the
# user's mistakes.


@pytest.mark.parametrize("multiple", [32, 8, 0])
def test_pad_to_multiple_pads_a_batch_as_pad_images_pads_its_images(multiple):
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in [(65, 97), (33, 128), (64, 20)]]
    padded, mask = pad_to_multiple(*pad_images(images), multiple)
    expected, expected_mask = pad_images(images, multiple)
    assert torch.equal(padded, expected) and torch.equal(mask, expected_mask)


@pytest.mark.parametrize("flags", [[], DEFORMABLE_FLAGS], ids=["detr", "deformable"])
def test_the_exported_computation_gives_each_image_of_any_batch_what_it_gets_alone(tmp_path, flags):
    """What the graph computes, in eager mode, on a batch padded to its largest image (no size a
    multiple of 32): each image's outputs are those of the model given the image alone."""
    model = export.load_detector(str(tiny_checkpoint(tmp_path / "tiny.pth", flags)))
    sizes = [(101, 133), (64, 70), (65, 97)]
    images, mask = export.padded_batch(sizes, seed=5)
    outputs = export.run_torch(model, (images, mask), postprocess=False)
    for i, (h, w) in enumerate(sizes):
        with torch.no_grad():
            alone = model([images[i, :, :h, :w]])
        expected = {name: alone[name] for name in export.OUTPUTS}
        assert_agrees({name: v[i : i + 1] for name, v in outputs.items()}, expected)


@pytest.mark.parametrize("grid", [7, 14, 56])
def test_sampled_pos_embed_is_the_per_image_resize(grid):
    """The batch-wide resampling of an exported graph gives each image the embedding that eager
    mode resizes to its grid (larger, smaller, the stored one), zero on padding."""
    torch.manual_seed(0)
    stage = Stage(3, 16, 4, grid, 1, 1, 2, 1, [0.0])
    extents = [(grid, grid), (30, 50), (3, 5), (17, 1), (64, 64)]
    padding = torch.ones(len(extents), 64, 64, dtype=torch.bool)
    for i, (h, w) in enumerate(extents):
        padding[i, :h, :w] = False
    with torch.no_grad():
        expected = stage.padded_pos_embed(padding)
        got = sampled_pos_embed(stage.pos_embed, padding)
    scale = stage.pos_embed.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    assert not got[padding.flatten(1)].any()


def refusal(args: argparse.Namespace, capsys) -> str:
    """The one line ``cli(export.main(args))`` prints for a user's mistake (exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        cli(lambda: export.main(args))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0]
    return lines[0]


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    line = refusal(export_args(tmp_path / "missing.pth", tmp_path / "m.onnx"), capsys)
    assert f"--resume {tmp_path / 'missing.pth'}: no such file" in line
    assert not (tmp_path / "m.onnx").exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    line = refusal(export_args(tmp_path / "notes.pth", tmp_path / "m.onnx"), capsys)
    assert "is not a readable checkpoint" in line


def test_an_output_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "unused.pth"
    line = refusal(export_args(checkpoint, tmp_path / "no" / "m.onnx"), capsys)
    assert "--output" in line


def test_an_opset_below_18_is_one_line(tmp_path, capsys):
    line = refusal(
        export_args(tmp_path / "unused.pth", tmp_path / "m.onnx", "--opset", "17"), capsys
    )
    assert "--opset 17" in line


def test_without_the_export_packages_the_install_command_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    line = refusal(export_args(tmp_path / "unused.pth", tmp_path / "m.onnx"), capsys)
    assert "onnxruntime" in line and "pip install -e '.[export]'" in line
