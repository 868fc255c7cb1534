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


@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_torch_multihead_attention(fused):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(D, HEADS, batch_first=True).eval()
    attn = MultiheadAttention(D, HEADS, fused_attn=fused).eval()
    attn.load_state_dict(reference.state_dict())
    query, key = torch.randn(2, 3, D), torch.randn(2, 7, D)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 4:] = True
    with torch.no_grad():
        expected = reference(query, key, key, key_padding_mask=mask)[0]
        torch.testing.assert_close(attn(query, key, key, mask), expected, atol=1e-5, rtol=1e-5)


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


def test_sine_encoding_matches_formula_over_the_valid_region():
    num_feats, temperature = 8, 10000.0
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, :3, :5] = False  # a 3 x 5 image padded to 4 x 6
    pos = PositionEmbeddingSine(num_feats, temperature, normalize=True)(mask)
    assert pos.shape == (1, 2 * num_feats, 4, 6)
    for y in range(3):
        for x in range(5):
            for i in range(num_feats):
                freq = temperature ** (2 * (i // 2) / num_feats)
                trig = math.sin if i % 2 == 0 else math.cos
                expect_y = trig((y + 1) / 3 * 2 * math.pi / freq)
                expect_x = trig((x + 1) / 5 * 2 * math.pi / freq)
                assert pos[0, i, y, x].item() == pytest.approx(expect_y, abs=1e-4)
                assert pos[0, num_feats + i, y, x].item() == pytest.approx(expect_x, abs=1e-4)


def test_sine_encoding_of_an_image_does_not_depend_on_its_padding():
    encoding = PositionEmbeddingSine(16)
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
