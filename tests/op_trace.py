"""Record the ATen operators that actually run, forward and backward."""

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

CONVOLUTION_OPS = ("convolution", "conv1d", "conv2d", "conv3d", "conv_transpose", "mkldnn_conv")


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def aten_ops(fn: Callable[[], object]) -> set[str]:
    """Run ``fn()`` and return the names of every ATen operator dispatched while it ran."""
    with _OpRecorder() as recorder:
        fn()
    return recorder.ops


def convolution_ops(ops: set[str]) -> set[str]:
    """The subset of ``ops`` that are convolutions of any kind."""
    return {op for op in ops if any(name in op for name in CONVOLUTION_OPS)}
