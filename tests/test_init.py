"""Initialisation: the simple_dlm layout must start with inputs in proportion and a position table that knows
locality (the cause of its unigram plateau), and `--init simple_dlm` must reproduce simple_dlm's N(0, 1) tables."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import user_error
from mlx_dlm.model import init_model, preset_args


def _rms(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.sqrt((a ** 2).mean()))


def _cos(a, b) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_simple_dlm_inputs_start_in_proportion():
    model = init_model(preset_args("simple_dlm", vocab_size=66), seed=0)
    tok, pos = np.array(model.tok_emb.weight), np.array(model.pos_emb)[:128]
    t = mx.linspace(0, 1, 11).reshape(-1, 1, 1)
    t_contrib = np.array(model.t_proj(t))
    # Token identity must not be drowned by the position code or by the mask-ratio vector that every
    # position shares (it was 10x smaller than the latter, so after LayerNorm all positions looked alike).
    assert 0.5 < _rms(tok) / _rms(pos) < 2.0
    assert _rms(t_contrib) < _rms(tok)


def test_simple_dlm_position_table_knows_locality_at_init():
    pos = np.array(init_model(preset_args("simple_dlm", vocab_size=66), seed=0).pos_emb, dtype=np.float64)[:128]
    near = _cos(pos[:-1], pos[1:]).mean()
    far = _cos(pos[:-64], pos[64:]).mean()
    assert near > 0.8 and far < 0.5 * near  # neighbours alike, distant rows much less so


def test_sinusoid_table_is_a_rotation_per_offset():
    from mlx_dlm.model import sinusoid_table

    table = np.array(sinusoid_table(64, 16), dtype=np.float64)
    assert _rms(table) == pytest.approx(1.0, rel=1e-5)
    # Row i+k is row i rotated by a fixed angle per (sin, cos) pair: the dot product depends on k only.
    dots = (table[:-3] * table[3:]).sum(-1)
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


@pytest.mark.parametrize("dim", [16, 7])
def test_sinusoid_table_matches_its_closed_form(dim):
    """Interleaved pairs sqrt(2)(sin, cos)(i / base^(j / (d // 2))), j < d // 2; an odd width ends in a zero column."""
    from mlx_dlm.model import SINUSOID_BASE, sinusoid_table

    half = dim // 2
    angles = np.arange(40)[:, None] / SINUSOID_BASE ** (np.arange(half)[None, :] / half)
    expected = np.zeros((40, dim))
    expected[:, 0:2 * half:2], expected[:, 1:2 * half:2] = np.sin(angles), np.cos(angles)
    np.testing.assert_allclose(np.array(sinusoid_table(40, dim)), np.sqrt(2.0) * expected, atol=2e-5)


def test_simple_dlm_scheme_draws_unit_normal_tables():
    model = init_model(preset_args("simple_dlm", vocab_size=66), seed=0, init="simple_dlm")
    for table in (np.array(model.tok_emb.weight), np.array(model.pos_emb)):
        assert abs(table.std() - 1.0) < 0.02 and abs(table.mean()) < 0.02
    assert _cos(np.array(model.pos_emb)[:-1], np.array(model.pos_emb)[1:]).mean() < 0.05  # no locality


def test_simple_dlm_first_layer_attends_to_neighbours_at_init():
    from reference import _layernorm, softmax, weights

    model = init_model(preset_args("simple_dlm", vocab_size=66), seed=0)
    W = weights(model)
    tokens = np.random.default_rng(0).integers(1, 66, size=(4, 128))
    t = np.full((4, 1), 0.5)
    x = W["tok_emb.weight"][tokens] + W["pos_emb"][:128] + (t @ W["t_proj.weight"].T + W["t_proj.bias"])[:, None]
    h = _layernorm(x, W["layers.0.attn_norm.weight"], W["layers.0.attn_norm.bias"], 1e-5)
    q, k, _ = np.split(h @ W["layers.0.attn.qkv.weight"].T + W["layers.0.attn.qkv.bias"], 3, axis=-1)
    attn = softmax(q @ k.transpose(0, 2, 1) / 16.0)
    dist = np.abs(np.arange(128)[:, None] - np.arange(128)[None, :])
    near, far = attn[:, dist == 1].mean(), attn[:, dist >= 32].mean()
    assert near > 3 * far  # a random table (the old init) gives near == far


def _query_key_rows(model, layer=0):
    """(query rows, key rows) of a layer's fused projection: weights, and biases when it has them."""
    qkv, d = model.layers[layer].attn.qkv, model.args.dim
    weight, bias = np.array(qkv.weight), np.array(qkv.bias) if "bias" in qkv else None
    return (weight[:d], weight[d:2 * d]), (None if bias is None else (bias[:d], bias[d:2 * d]))


@pytest.mark.parametrize("preset", ["simple_dlm", "base"])  # a learned table, and RoPE; both with biases
def test_local_init_starts_every_key_projection_as_its_query(preset):
    model = init_model(preset_args(preset, vocab_size=66, n_layers=2), seed=0)
    for layer in range(2):
        (q, k), (bq, bk) = _query_key_rows(model, layer)
        np.testing.assert_array_equal(q, k)
        np.testing.assert_array_equal(bq, bk)
    # The other scheme leaves MLX's independent draws, and grouped keys (GQA) cannot equal the queries.
    (q, k), _ = _query_key_rows(init_model(preset_args(preset, vocab_size=66, n_layers=2), seed=0,
                                           init="simple_dlm"))
    assert not np.allclose(q, k)
    gqa = init_model(preset_args(preset, vocab_size=66, n_layers=2, n_heads=4, n_kv_heads=2), seed=0)
    assert gqa.layers[0].attn.qkv.weight.shape[0] == 256 + 2 * 2 * 64  # untouched: 4 query heads, 2 key, 2 value


def test_unknown_init_scheme_is_named_with_the_choices():
    assert user_error(init_model, preset_args("tiny", vocab_size=66), init="xavier") == (
        "unknown init 'xavier' (choose from local, simple_dlm)")
