import mlx.core as mx
import numpy as np
import pytest

from mlx_dlm.model import ModelArgs, init_model, preset_args

from conftest import user_error
from reference import forward

SMALL = dict(vocab_size=20, dim=32, n_layers=2, hidden_dim=48, max_seq_len=40)


@pytest.mark.parametrize("layout", [
    dict(preset="simple_dlm", n_heads=1),
    dict(preset="tiny", n_heads=4),
    # norm_eps far from the norms' own defaults, so the configured one must reach them
    dict(preset="tiny", n_heads=2, mlp="gelu", norm="layernorm", bias=True, pos_emb="learned", norm_eps=0.5),
    # LLaDA-like (GQA 4/2, RoPE theta, no time conditioning) and Dream-like (q/k/v bias only, shifted logits)
    dict(preset="tiny", n_heads=4, n_kv_heads=2, rope_theta=500000.0, time_cond=False, norm_eps=0.3),
    dict(preset="tiny", n_heads=4, n_kv_heads=1, qkv_bias=True, logit_shift=True, time_cond=False),
])
def test_forward_matches_numpy_reference(layout):
    layout = dict(layout)
    model = init_model(preset_args(layout.pop("preset"), **SMALL, **layout), seed=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(3, 17)).astype(np.int32)
    t = np.array([0.1, 0.5, 0.9], dtype=np.float32)
    got = np.array(model(mx.array(tokens), mx.array(t)))
    want = forward(model, tokens, t.astype(np.float64))
    assert got.shape == (3, 17, 20) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_simple_dlm_preset_parameter_count():
    V, d, L = 66, 256, 10
    per_layer = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = V * d + 1024 * d + (d + d) + L * per_layer + (d * V + V)  # as simple_dlm's model.py lays it out
    assert init_model(preset_args("simple_dlm", vocab_size=V)).num_params() == expected


def test_attention_is_bidirectional_and_t_matters():
    model = init_model(preset_args("tiny", **SMALL), seed=0)
    x = mx.array(np.arange(1, 11, dtype=np.int32)[None] % 20)
    y = mx.array(x)
    y[0, 9] = 5
    t = mx.array([0.5])
    assert not np.allclose(np.array(model(x, t)[0, 0]), np.array(model(y, t)[0, 0]))  # the future is seen
    assert not np.allclose(np.array(model(x, t)), np.array(model(x, mx.array([0.9]))))
    with pytest.raises(ValueError, match=r"^this diffusion model needs the mask ratio t \(B,\)$"):
        model(x)


@pytest.mark.parametrize("build, message", [
    (lambda: ModelArgs(dim=30, n_heads=4), "model config: dim 30 is not divisible by n_heads 4"),
    (lambda: ModelArgs(norm="batchnorm"), "model config: norm must be one of layernorm, rmsnorm, got 'batchnorm'"),
    (lambda: ModelArgs(n_heads=4, n_kv_heads=3), "model config: n_heads 4 is not a multiple of n_kv_heads 3"),
    (lambda: ModelArgs(dropout=1.0), "model config: dropout must be in [0, 1), got 1.0"),
    (lambda: ModelArgs(vocab_size=10, subs_mask_id=10),
     "model config: subs_mask_id 10 is not a token id of the vocabulary of 10"),
    (lambda: preset_args("huge"), "unknown preset 'huge' (choose from tiny, simple_dlm, base, small)"),
])
def test_bad_config_is_one_line_naming_the_field(build, message):
    assert user_error(build) == message


def test_ar_models_are_never_time_conditioned():
    args = ModelArgs(model_type="ar", time_cond=True)
    assert args.time_cond is False and args.to_dict()["time_cond"] is False


def _ar_model(**overrides):
    return init_model(preset_args("tiny", **{**SMALL, "model_type": "ar", **overrides}), seed=2)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_ar_matches_reference_and_cannot_see_the_future(pos):
    model = _ar_model(pos_emb=pos)
    assert "t_proj" not in model and not model.args.time_cond
    tokens = np.random.default_rng(1).integers(0, 20, size=(2, 12)).astype(np.int32)
    got = np.array(model(mx.array(tokens)))
    np.testing.assert_allclose(got, forward(model, tokens, None), atol=2e-4, rtol=1e-4)
    changed = tokens.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20
    got2 = np.array(model(mx.array(changed)))
    np.testing.assert_allclose(got2[:, :7], got[:, :7], atol=1e-6)  # positions before 7 never see it
    assert not np.allclose(got2[:, 7:], got[:, 7:])


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_kv_cache_decode_matches_full_forward(pos):
    from mlx_dlm.model import KVCache

    model = _ar_model(pos_emb=pos)
    tokens = mx.array(np.random.default_rng(2).integers(0, 20, size=(3, 15)).astype(np.int32))
    full = np.array(model(tokens))
    cache = KVCache(model.args, 3, 20)  # larger than needed: unwritten slots must be ignored
    pieces = [model(tokens[:, :6], cache=cache)]  # prefill
    pieces += [model(tokens[:, i:i + 1], cache=cache) for i in range(6, 15)]  # one token at a time
    np.testing.assert_allclose(np.concatenate([np.array(p) for p in pieces], axis=1), full, atol=1e-5, rtol=1e-5)
    assert cache.offset.item() == 15


@pytest.mark.parametrize("layout", [
    dict(preset="simple_dlm", n_heads=1),
    dict(preset="tiny", n_heads=4, n_kv_heads=2),  # SwiGLU, output projection, GQA
    dict(preset="tiny", n_heads=4, mlp="gelu", attn_out_proj=False, tie_embeddings=True),
])
def test_flops_per_token_counts_every_weight_matmul_and_attention(layout):
    """2 FLOPs per multiply-add of every weight matrix a token goes through (the blocks' Linear layers and the
    output head, tied or not), plus 4 x seq_len x dim per layer for attention scores and values."""
    import mlx.nn as nn

    layout = dict(layout)
    args = preset_args(layout.pop("preset"), **SMALL, **layout)
    model = init_model(args, seed=0)
    block_weights = sum(module.weight.size for name, module in model.named_modules()
                        if name.startswith("layers.") and isinstance(module, nn.Linear))
    head = args.vocab_size * args.dim
    for seq_len in (1, 33):
        want = 2 * (block_weights + head) + 4 * args.n_layers * seq_len * args.dim
        assert model.flops_per_token(seq_len) == want


@pytest.mark.parametrize("mlp", ["relu", "swiglu"])
@pytest.mark.parametrize("bias, qkv_bias", [(True, None), (False, None), (False, True)])
def test_bias_flags_reach_every_layer(mlp, bias, qkv_bias):
    """bias: every Linear and LayerNorm of the blocks has one (or none); qkv_bias overrides it for the q/k/v
    projection alone (Qwen2/Dream); output_bias decides the head's."""
    import mlx.nn as nn

    args = preset_args("tiny", **SMALL, mlp=mlp, norm="layernorm", bias=bias, qkv_bias=qkv_bias, output_bias=True)
    model = init_model(args, seed=0)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and name.startswith("layers."):
            want = qkv_bias if qkv_bias is not None and name.endswith(".qkv") else bias
            assert ("bias" in module) == want, name
    assert "bias" in model.lm_head


def test_decode_layout_keeps_every_value_and_one_copy_in_column_major_order(tmp_path):
    """load lays dense weights out column-major on the CPU backend (x @ W.T as BLAS's no-transpose product):
    the same values, in one buffer per weight, so forward passes (one row, a few rows of a cached pass, many) match
    the numpy reference and saving writes the same file back."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    import mlx_dlm
    from mlx_dlm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrs ")
    model = init_model(preset_args("tiny", **{**SMALL, "vocab_size": tok.vocab_size}, model_type="ar"), seed=4)
    mlx_dlm.save_model(tmp_path / "m", model, tok)
    loaded, _ = mlx_dlm.load(tmp_path / "m")
    dense = [m.weight for _, m in loaded.named_modules() if type(m) is nn.Linear]
    assert len(dense) == 5 * SMALL["n_layers"] + 1  # q/k/v, attention out, SwiGLU's three; the head
    layouts = [np.array(w).flags for w in dense]
    assert all(f["F_CONTIGUOUS"] and not f["C_CONTIGUOUS"] for f in layouts)
    assert all(m.weight.dtype == mx.float32 for _, m in loaded.named_modules() if type(m) is nn.Linear)
    before = dict(tree_flatten(model.parameters()))
    for name, value in tree_flatten(loaded.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(before[name]), err_msg=name)
    tokens = np.random.default_rng(5).integers(0, tok.vocab_size, size=(2, 9)).astype(np.int32)
    want = forward(loaded, tokens, None)
    for rows in (1, 3, 9):  # a decode step, a verify pass, a prompt
        got = np.array(loaded(mx.array(tokens[:, :rows])))
        np.testing.assert_allclose(got, want[:, :rows], atol=2e-4, rtol=1e-4)
    mlx_dlm.save_model(tmp_path / "again", loaded, tok)
    first, second = (mx.load(str(tmp_path / d / "model.safetensors")) for d in ("m", "again"))
    assert first.keys() == second.keys()
    assert all(np.array_equal(np.array(first[k]), np.array(second[k])) for k in first)
