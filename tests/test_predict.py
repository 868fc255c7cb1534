"""predict.py on a tiny untrained checkpoint, and the attention maps it draws."""

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import datasets
import predict
from datasets.shapes import SHAPE_NAMES, ensure_shapes
from options import get_args_parser as training_parser
from tests.conftest import (
    NUM_CLASSES,
    QUERIES,
    TINY_DATA_FLAGS,
    TINY_MODEL_FLAGS,
    build_tiny,
    save_checkpoint,
)
from tools.attention_maps import DetrAttention
from util.errors import cli


def tiny_flags(data: Path) -> list[str]:
    """The tiny configuration; the backbone file it names is gone (the checkpoint replaces it)."""
    return [
        *TINY_DATA_FLAGS, "--coco_path", str(data), *TINY_MODEL_FLAGS,
        "--pretrained_backbone", "/nonexistent/backbone.pth",
    ]  # fmt: skip


def tiny_model(flags: list[str]) -> tuple[torch.nn.Module, argparse.Namespace]:
    """The tiny model (initialised from seed 0) and the flags a checkpoint of it saves."""
    args = vars(training_parser().parse_args(flags)) | {"num_classes": NUM_CLASSES}
    return build_tiny()[0], argparse.Namespace(**args)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One prediction over the built-in validation images, a 36 x 64 crop, and a broken file."""
    tmp = tmp_path_factory.mktemp("predict")
    flags = tiny_flags(tmp / "data")
    ensure_shapes(tmp / "data", datasets.shapes_spec(training_parser().parse_args(flags)))
    model, args = tiny_model(flags)
    save_checkpoint(tmp / "checkpoint.pth", model, args)
    images = tmp / "images"
    shutil.copytree(tmp / "data" / "val2017", images)
    first = sorted(images.iterdir())[0]
    Image.open(first).crop((0, 0, 64, 36)).save(images / "wide.png")
    (images / "broken.png").write_bytes(b"not an image")
    argv = [
        str(images), "--resume", str(tmp / "checkpoint.pth"), "--json", str(tmp / "out.json"),
        "--render", str(tmp / "drawn"), "--attention", str(tmp / "attention"),
        "--score_threshold", "0", "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
    ]  # fmt: skip
    parser = argparse.ArgumentParser(parents=[predict.get_args_parser()])
    logger = logging.getLogger("predict")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        skipped = predict.main(parser.parse_args(argv))
    finally:
        logger.removeHandler(handler)
    return {"tmp": tmp, "images": images, "skipped": skipped, "messages": messages}


def readable(run) -> list[Path]:
    return sorted(p for p in run["images"].iterdir() if p.name != "broken.png")


def test_json_has_a_coco_style_record_per_query_of_every_readable_image(run):
    records = json.loads((run["tmp"] / "out.json").read_text())
    assert len(records) == QUERIES * len(readable(run))  # threshold 0 keeps every query
    assert {r["file_name"] for r in records} == {str(p) for p in readable(run)}
    for r in records:
        assert set(r) == {"file_name", "category_id", "category_name", "score", "bbox"}
        assert 0 <= r["score"] <= 1
        width, height = Image.open(r["file_name"]).size
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and -0.01 <= x <= x + w <= width + 0.01
        assert -0.01 <= y <= y + h <= height + 0.01
        # Names come from the data set's annotation file: ids 1..2, and 0 has no name.
        expected = dict(enumerate(SHAPE_NAMES[:2], start=1)).get(r["category_id"])
        assert r["category_name"] == (expected or str(r["category_id"]))


def test_drawings_have_the_size_of_their_image(run):
    for path in readable(run):
        drawn = Image.open(run["tmp"] / "drawn" / f"{path.stem}.png")
        assert drawn.size == Image.open(path).size
    assert Image.open(run["tmp"] / "drawn" / "wide.png").size == (64, 36)


def test_an_unreadable_image_is_reported_by_name_and_skipped(run):
    assert run["skipped"] == [run["images"] / "broken.png"]
    assert any("broken.png" in m and "skipped" in m for m in run["messages"])
    assert not (run["tmp"] / "drawn" / "broken.png").exists()


def test_attention_figures_are_written_per_image(run):
    for path in readable(run):
        for part in ("decoder", "encoder"):
            assert Image.open(run["tmp"] / "attention" / f"{path.stem}_{part}.png").size[0] > 100


def test_category_names_fall_back_to_shape_names_then_ids(tmp_path):
    args = training_parser().parse_args(["--coco_path", str(tmp_path), "--shapes_classes", "2"])
    assert predict.category_names(args) == {1: "square", 2: "circle"}
    coco = training_parser().parse_args(["--dataset_file", "coco", "--coco_path", str(tmp_path)])
    assert predict.category_names(coco) == {}


def test_a_missing_input_is_named():
    with pytest.raises(SystemExit, match="nowhere.jpg"):
        predict.list_images(["nowhere.jpg"])


def test_attention_maps_cover_each_image_without_its_padding():
    model, _ = tiny_model(tiny_flags(Path("unused")))
    model.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 32, 64, generator=g), torch.randn(3, 64, 24, generator=g)]
    with torch.no_grad():
        plain = model(images)["pred_logits"]
        with DetrAttention(model) as attn:
            hooked = model(images)["pred_logits"]
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)  # hooks do not change inference
    assert not model.transformer.decoder.layers[-1].multihead_attn._forward_hooks  # removed
    stride = 8  # feature_stage 2
    for index, (height, width) in enumerate([(32, 64), (64, 24)]):
        maps = attn.decoder(index, torch.arange(3))
        assert maps.shape == (3, height // stride, width // stride)  # the image's aspect ratio
        torch.testing.assert_close(maps.sum((1, 2)), torch.ones(3))  # nothing on padding
        points = attn.encoder(index, torch.tensor([[0.0, 0.0], [0.99, 0.99]]))
        assert points.shape == (2, height // stride, width // stride)
        torch.testing.assert_close(points.sum((1, 2)), torch.ones(2))


def test_attention_maps_are_refused_for_a_decoder_other_than_detrs():
    model = build_tiny(anchor_queries=True)[0]
    with pytest.raises(ValueError, match="drop --attention"):
        DetrAttention(model)


# --onnx: what needs the PyTorch model is refused, and so is a file export.py did not write
# (predict.py --onnx on exported files: tests/test_export.py).


def onnx_refusal(tmp_path: Path, capsys, *flags: str) -> str:
    """The one line predict.py prints for ``--onnx`` with ``flags`` (exit status 2)."""
    parser = argparse.ArgumentParser(parents=[predict.get_args_parser()])
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    args = parser.parse_args([str(image), "--json", str(tmp_path / "out.json"), *flags])
    with pytest.raises(SystemExit) as stop:
        cli(lambda: predict.main(args))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "; " in lines[0]
    assert not (tmp_path / "out.json").exists()
    return lines[0]


@pytest.mark.parametrize(
    "flags",
    [["--resume", "run.pth"], ["--attention", "maps"], ["--device", "cuda"], ["--amp", "bf16"]],
    ids=" ".join,
)
def test_onnx_refuses_what_needs_the_pytorch_model(tmp_path, capsys, flags):
    (tmp_path / "model.onnx").write_bytes(b"")
    line = onnx_refusal(tmp_path, capsys, "--onnx", str(tmp_path / "model.onnx"), *flags)
    assert flags[0] in line and "--onnx" in line


def test_onnx_names_a_missing_file(tmp_path, capsys):
    line = onnx_refusal(tmp_path, capsys, "--onnx", str(tmp_path / "missing.onnx"))
    assert "missing.onnx: no such file" in line and "export.py" in line


def test_onnx_names_a_file_that_onnxruntime_cannot_read(tmp_path, capsys):
    (tmp_path / "notes.onnx").write_text("not a model")
    line = onnx_refusal(tmp_path, capsys, "--onnx", str(tmp_path / "notes.onnx"))
    assert "notes.onnx: onnxruntime cannot load it" in line


def test_onnx_names_a_file_without_training_flags(tmp_path, capsys):
    """An ONNX file that export.py did not write (here a one-node graph) holds no flags."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    images, out = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "ab")
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g", [images], [out])
    onnx.save(helper.make_model(graph), tmp_path / "other.onnx")
    line = onnx_refusal(tmp_path, capsys, "--onnx", str(tmp_path / "other.onnx"))
    assert "holds no training flags" in line and "export.py" in line


def test_onnx_without_onnxruntime_names_the_install_command(tmp_path, capsys, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    line = onnx_refusal(tmp_path, capsys, "--onnx", str(tmp_path / "model.onnx"))
    assert "onnxruntime" in line and "pip install -e '.[export]'" in line
