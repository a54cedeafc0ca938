import mlx.core as mx
import numpy as np
import pytest

from mlx_dlm.errors import UserError
from mlx_dlm.model import ModelArgs, init_model, preset_args

from reference import forward

SMALL = dict(vocab_size=20, dim=32, n_layers=2, hidden_dim=48, max_seq_len=40)


@pytest.mark.parametrize("layout", [
    dict(preset="simple_dlm", n_heads=1),
    dict(preset="tiny", n_heads=4),
    dict(preset="tiny", n_heads=2, mlp="gelu", norm="layernorm", bias=True, pos_emb="learned"),
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


def test_bad_config():
    with pytest.raises(UserError, match="not divisible"):
        ModelArgs(dim=30, n_heads=4)
    with pytest.raises(UserError, match="norm must be one of"):
        ModelArgs(norm="batchnorm")
    with pytest.raises(UserError, match="unknown preset"):
        preset_args("huge")
