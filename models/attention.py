"""The attention kernel shared by the backbone and the transformer.

Every attention in the project goes through :func:`attention`. The fused path is
``F.scaled_dot_product_attention``; the eager path is the plain computation of the official
PVT and DETR code (matmul, softmax, matmul), kept so that tests and benchmarks can compare the
two and so that attention weights can be read. Modules that call :func:`attention` carry a
``fused_attn`` attribute; :func:`set_fused_attention` flips it on every module of a model.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> Tensor:
    """Scaled dot-product attention over heads.

    Args:
        q: [B, heads, Lq, head_dim]
        k, v: [B, heads, Lk, head_dim]
        key_padding_mask: [B, Lk] bool, True where the key is padding (ignored), or None.
        dropout_p: dropout on the attention weights (pass 0.0 in eval mode).
        fused: use ``F.scaled_dot_product_attention``; False runs the eager reference.

    Returns:
        [B, heads, Lq, head_dim]
    """
    attn_mask = None
    if key_padding_mask is not None:
        # Additive mask, broadcast over heads and queries; -inf on padding keys.
        attn_mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        attn_mask = attn_mask.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    weights = attention_weights(q, k, attn_mask)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask): [B, heads, Lq, Lk]. The eager path and visualisation."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(dim=-1)


def set_fused_attention(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every attention module of ``model`` between the fused and the eager path."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
    return model
