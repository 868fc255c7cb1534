"""The attention kernel shared by the backbone and the transformer.

Every attention in the project goes through :func:`attention`. The fused path is
``F.scaled_dot_product_attention``; the eager path is the plain computation of the official
PVT and DETR code (matmul, softmax, matmul), kept so that tests and benchmarks can compare the
two and so that attention weights can be read. Modules that call :func:`attention` carry a
``fused_attn`` attribute; :func:`set_fused_attention` flips it on every module of a model.

Masks follow ``nn.MultiheadAttention``: a ``key_padding_mask`` [B, Lk] is True on keys to ignore;
an ``attn_mask`` is either bool, True where a query may NOT attend to a key, or a float mask added
to the attention scores (``-inf`` forbids). Both may be given; they combine. Every query must keep
at least one key it may attend to, or its output is NaN.
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
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention over heads.

    Args:
        q: [B, heads, Lq, head_dim]
        k, v: [B, heads, Lk, head_dim]
        key_padding_mask: [B, Lk] bool, True where the key is padding (ignored), or None.
        dropout_p: dropout on the attention weights (pass 0.0 in eval mode).
        fused: use ``F.scaled_dot_product_attention``; False runs the eager reference.
        attn_mask: [Lq, Lk], [B, Lq, Lk] or [B, heads, Lq, Lk]; bool (True = may not attend) or
            additive float; or None.

    Returns:
        [B, heads, Lq, head_dim]
    """
    mask = additive_mask(q, key_padding_mask, attn_mask)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    weights = attention_weights(q, k, mask)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """:func:`attention` over projected queries [B, Lq, E], keys [B, Lk, E] and values
    [B, Lk, d], each split into ``num_heads`` slices (queries and keys may be wider than the
    values), the heads' outputs concatenated -> [B, Lq, d]."""
    q, k, v = (x.unflatten(-1, (num_heads, -1)).transpose(1, 2) for x in (query, key, value))
    out = attention(q, k, v, key_padding_mask, dropout_p, fused=fused, attn_mask=attn_mask)
    return out.transpose(1, 2).flatten(2)


def additive_mask(
    q: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None
) -> Tensor | None:
    """The masks as one float mask in ``q``'s dtype, broadcastable to [B, heads, Lq, Lk]."""
    mask = None
    if key_padding_mask is not None:
        # Broadcast over heads and queries; -inf on padding keys.
        mask = _as_additive(key_padding_mask, q.dtype)[:, None, None, :]
    if attn_mask is not None:
        extra = _as_additive(attn_mask, q.dtype)
        if extra.dim() == 3:  # [B, Lq, Lk]: the same for every head
            extra = extra[:, None]
        mask = extra if mask is None else mask + extra
    return mask


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask): [B, heads, Lq, Lk]. The eager path and visualisation.

    ``attn_mask`` is additive here (see :func:`additive_mask`)."""
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
