"""Running an ONNX file with onnxruntime (an optional package: ``pip install -e '.[export]'``)."""

from pathlib import Path

import torch
from torch import Tensor

# The metadata key under which export.py stores the flags of the checkpoint's run (JSON), which
# predict.py --onnx reads.
FLAGS_KEY = "pvt_detr.flags"


def onnx_session(path: str | Path):
    """An onnxruntime CPU session of ``path`` using torch's thread count."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The session's outputs on ``inputs`` (the graph's input order), by name, as tensors."""
    names = [i.name for i in session.get_inputs()]
    feed = {name: tensor.numpy() for name, tensor in zip(names, inputs, strict=True)}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, map(torch.from_numpy, session.run(None, feed)), strict=True))
