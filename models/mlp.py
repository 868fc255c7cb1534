"""The small multi-layer perceptron of DETR's box head, also used by the anchor queries; heads
cloned per decoder layer."""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class LayerHeads(nn.ModuleList):
    """One copy of a head per decoder layer (Deformable DETR's box refinement clones its class
    and box heads, ``class_embed.<layer>``, ``bbox_embed.<layer>``): indexed by the decoder, or
    called on every layer's outputs at once."""

    def __init__(self, head: nn.Module, num_layers: int):
        super().__init__(copy.deepcopy(head) for _ in range(num_layers))

    def forward(self, hs: Tensor) -> Tensor:
        """hs [num_layers, ..., d] -> each layer's head on its outputs, stacked."""
        if hs.shape[0] != len(self):
            raise ValueError(f"{len(self)} per-layer heads, got {hs.shape[0]} layers' outputs")
        return torch.stack([head(x) for head, x in zip(self, hs, strict=True)])
