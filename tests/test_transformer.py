"""The DETR transformer and positional encodings against references written here."""

import math

import pytest
import torch
from torch import nn

from models.attention import set_fused_attention
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from models.transformer import MultiheadAttention, Transformer
from tests.conftest import DEC, ENC, FFN, HEADS
from tests.conftest import HIDDEN as D
from tests.reference import ReferenceTransformer, transformer_inputs


def ours(pre_norm: bool) -> Transformer:
    return Transformer(D, HEADS, ENC, DEC, FFN, dropout=0.0, pre_norm=pre_norm).eval()


# --- Tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pre_norm", [False, True])
def test_official_layout_loads_and_matches_multihead_attention_reference(pre_norm):
    torch.manual_seed(0)
    reference = ReferenceTransformer(pre_norm).eval()
    model = ours(pre_norm)
    model.load_state_dict(reference.state_dict())  # strict: same names and shapes
    src, mask, query_embed, pos = transformer_inputs()
    with torch.no_grad():
        hs, memory = model(src, mask, query_embed, pos)
        expected = reference(src, mask, query_embed, pos)
    assert hs.shape == (DEC, 2, 5, D)
    assert memory.shape == (2, 12, D)
    torch.testing.assert_close(hs, expected, atol=1e-5, rtol=1e-5)


def test_fused_and_eager_attention_agree():
    torch.manual_seed(0)
    model = ours(pre_norm=False)
    inputs = transformer_inputs()
    with torch.no_grad():
        fused = model(*inputs)[0]
        eager = set_fused_attention(model, False)(*inputs)[0]
    assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_result():
    torch.manual_seed(0)
    model = ours(pre_norm=False)
    src, _, query_embed, pos = transformer_inputs(batch=1, length=6)  # unpadded
    padded_src = torch.cat([src, torch.randn(1, 4, D)], 1)
    padded_pos = torch.cat([pos, torch.randn(1, 4, D)], 1)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad():
        hs, memory = model(src, None, query_embed, pos)
        hs_padded, memory_padded = model(padded_src, mask, query_embed, padded_pos)
    torch.testing.assert_close(hs_padded, hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory_padded[:, :6], memory, atol=1e-5, rtol=1e-5)


def group_mask(queries: int, groups: int) -> torch.Tensor:
    """[Q, Q] bool, True where a query may not attend: each query sees only its own group."""
    group = torch.arange(queries) // (queries // groups)
    return group[:, None] != group[None, :]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # the reference's
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", ["none", "shared", "per_image"])
def test_attention_matches_torch_multihead_attention(fused, shape):
    """With the key padding mask alone, or beside an attn_mask ([Lq, Lk] shared by the batch
    or [B, Lq, Lk]; bool or additive), on both kernels."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    attn = MultiheadAttention(D, HEADS, fused_attn=fused).eval()
    attn.load_state_dict(reference.state_dict())
    query, key = torch.randn(2, 4, D), torch.randn(2, 7, D)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 5:] = True
    blocked = torch.rand(2, 4, 7) < 0.4
    blocked[..., 0] = False  # every query keeps a key
    if shape == "shared":
        blocked = blocked[0]
    additive = torch.randn(blocked.shape).masked_fill(blocked, float("-inf"))
    with torch.no_grad():
        for mask in (blocked, additive) if shape != "none" else (None,):
            # nn.MultiheadAttention takes a per-image mask repeated for each head.
            per_head = mask.repeat_interleave(HEADS, 0) if shape == "per_image" else mask
            expected = reference(query, key, key, key_padding_mask=padding, attn_mask=per_head)
            got = attn(query, key, key, padding, mask)
            torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)


def test_masked_decoder_groups_do_not_see_each_other():
    """A block-diagonal self-attention mask isolates query groups: changing group 1's queries
    leaves group 0's outputs exactly as they are, on both kernels, and the fused and eager
    kernels agree."""
    torch.manual_seed(0)
    model = ours(pre_norm=False)
    src, mask, _, pos = transformer_inputs()
    query_pos, tgt = torch.randn(2, 6, D), torch.randn(2, 6, D)
    other_pos, other_tgt = query_pos.clone(), tgt.clone()
    other_pos[:, 3:] += 1.0
    other_tgt[:, 3:] -= 1.0
    groups = group_mask(6, 2)
    outputs = []
    with torch.no_grad():
        for fused in (True, False):
            set_fused_attention(model, fused)
            hs = model(src, mask, query_pos, pos, tgt=tgt, self_attn_mask=groups)[0]
            hs_other = model(src, mask, other_pos, pos, tgt=other_tgt, self_attn_mask=groups)[0]
            torch.testing.assert_close(hs_other[:, :, :3], hs[:, :, :3], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(hs_other[:, :, 3:], hs[:, :, 3:])
            alone = model(src, mask, query_pos[:, :3], pos, tgt=tgt[:, :3])[0]
            torch.testing.assert_close(hs[:, :, :3], alone, atol=1e-5, rtol=1e-5)
            outputs.append(hs)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_an_encoder_attention_mask_restricts_what_is_seen():
    torch.manual_seed(0)
    model = ours(pre_norm=False)
    src, _, _, pos = transformer_inputs(batch=1, length=8)
    local = torch.ones(8, 8, dtype=torch.bool).triu(1)  # token i sees tokens 0..i
    changed = src.clone()
    changed[:, 5:] += 1.0
    with torch.no_grad():
        memory = model.encoder(src, pos, None, local)
        memory_changed = model.encoder(changed, pos, None, local)
    torch.testing.assert_close(memory_changed[:, :5], memory[:, :5], atol=1e-6, rtol=1e-6)


def test_the_decoder_starts_from_the_target_it_is_given():
    torch.manual_seed(0)
    model = ours(pre_norm=False)
    src, mask, query_embed, pos = transformer_inputs()
    query_pos = query_embed[None].expand(2, -1, -1)
    with torch.no_grad():
        default = model(src, mask, query_embed, pos)[0]
        zeros = model(src, mask, query_pos, pos, tgt=torch.zeros_like(query_pos))[0]
        other = model(src, mask, query_pos, pos, tgt=torch.randn_like(query_pos))[0]
    assert torch.equal(zeros, default)  # DETR's zeros unless a target is given
    assert not torch.allclose(other, default)


@pytest.mark.parametrize("offset", [0.0, 0.5])  # DETR's, Deformable DETR's
def test_sine_encoding_matches_formula_over_the_valid_region(offset):
    num_feats, temperature = 8, 10000.0
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, :3, :5] = False  # a 3 x 5 image padded to 4 x 6
    pos = PositionEmbeddingSine(num_feats, temperature, normalize=True, offset=offset)(mask)
    assert pos.shape == (1, 2 * num_feats, 4, 6)
    for y in range(3):
        for x in range(5):
            for i in range(num_feats):
                freq = temperature ** (2 * (i // 2) / num_feats)
                trig = math.sin if i % 2 == 0 else math.cos
                expect_y = trig((y + 1 - offset) / 3 * 2 * math.pi / freq)
                expect_x = trig((x + 1 - offset) / 5 * 2 * math.pi / freq)
                assert pos[0, i, y, x].item() == pytest.approx(expect_y, abs=1e-4)
                assert pos[0, num_feats + i, y, x].item() == pytest.approx(expect_x, abs=1e-4)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_sine_encoding_of_an_image_does_not_depend_on_its_padding(offset):
    encoding = PositionEmbeddingSine(16, offset=offset)
    alone = encoding(torch.zeros(1, 3, 5, dtype=torch.bool))
    mask = torch.ones(1, 7, 9, dtype=torch.bool)
    mask[0, :3, :5] = False
    torch.testing.assert_close(encoding(mask)[..., :3, :5], alone)


def test_learned_encoding_columns_then_rows_and_size_limit():
    encoding = PositionEmbeddingLearned(num_pos_feats=4, max_size=6)
    pos = encoding(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 8, 3, 5)
    torch.testing.assert_close(pos[0, :4, 1, 2], encoding.col_embed.weight[2])
    torch.testing.assert_close(pos[1, 4:, 1, 2], encoding.row_embed.weight[1])
    with pytest.raises(ValueError, match="7x5 feature map exceeds"):
        encoding(torch.zeros(1, 7, 5, dtype=torch.bool))
