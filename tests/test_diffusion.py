import mlx.core as mx
import numpy as np
import pytest

from mlx_dlm.diffusion import T_MIN, corrupt, diffusion_loss, masked_loss, sample_t
from mlx_dlm.model import init_model, preset_args

from reference import forward, log_softmax


def test_masking_rate_matches_t():
    tokens = mx.ones((4, 20_000), dtype=mx.int32) * 7
    t = mx.array([0.05, 0.3, 0.6, 0.95])
    noisy, hidden = corrupt(tokens, t, mask_id=0, key=mx.random.key(3))
    noisy, hidden = np.array(noisy), np.array(hidden)
    rate = hidden.mean(axis=1)
    sd = np.sqrt(np.array(t) * (1 - np.array(t)) / 20_000)
    assert (np.abs(rate - np.array(t)) < 5 * sd).all()
    assert ((noisy == 0) == hidden).all() and (noisy[~hidden] == 7).all()  # only hidden positions change


def test_masks_are_independent_across_positions():
    _, hidden = corrupt(mx.ones((1, 50_000), dtype=mx.int32), mx.array([0.5]), 0, key=mx.random.key(0))
    h = np.array(hidden[0]).astype(np.float64)
    corr = np.corrcoef(h[:-1], h[1:])[0, 1]
    assert abs(corr) < 0.03


def test_stratified_t_has_one_draw_per_bin():
    B = 64
    t = np.array(sample_t(B, "stratified", key=mx.random.key(1)))
    bins = np.floor((t - T_MIN) / (1 - T_MIN) * B).astype(int)
    assert sorted(bins.tolist()) == list(range(B))
    u = np.array(sample_t(20_000, "uniform", key=mx.random.key(2)))
    assert T_MIN <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize("loss", ["elbo", "masked-mean"])
def test_loss_matches_numpy_reference(loss):
    model = init_model(preset_args("tiny", vocab_size=12, dim=32, n_layers=1, max_seq_len=16), seed=0)
    rng = np.random.default_rng(0)
    targets = rng.integers(1, 12, size=(4, 16)).astype(np.int32)
    key = mx.random.key(5)
    got = diffusion_loss(model, mx.array(targets), mask_id=0, loss=loss, key=key).item()

    # Recompute the same draw (same key split) and the loss by hand in float64.
    t_key, mask_key = mx.random.split(key)
    t = np.array(sample_t(4, "stratified", key=t_key), dtype=np.float64)
    noisy, hidden = (np.array(a) for a in corrupt(mx.array(targets), mx.array(t, dtype=mx.float32), 0, key=mask_key))
    logp = log_softmax(forward(model, noisy, t))
    nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if loss == "elbo":
        want = (nll * hidden / t[:, None]).sum() / targets.size
    else:
        want = (nll * hidden).sum() / hidden.sum()
    assert hidden.any()
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_masked_mean_ignores_visible_positions():
    logits = mx.random.normal((1, 4, 5), key=mx.random.key(0))
    targets = mx.array([[1, 2, 3, 4]])
    hidden = mx.array([[True, False, False, False]])
    t = mx.array([0.25])
    ce0 = -log_softmax(np.array(logits, dtype=np.float64))[0, 0, 1]
    np.testing.assert_allclose(masked_loss(logits, targets, hidden, t, "masked-mean").item(), ce0, rtol=1e-5)
    np.testing.assert_allclose(masked_loss(logits, targets, hidden, t, "elbo").item(), ce0 / 0.25 / 4, rtol=1e-5)


def test_batch_and_uniform_t_sampling():
    """"batch": one ratio for the whole batch, reproducible from its key; "uniform": independent draws, so (with
    this key) not one per bin; an unknown mode names the choices. (Survivors of a mutmut run on diffusion.py.)"""
    key = mx.random.key(4)
    t = np.array(sample_t(8, "batch", key=key))
    assert (t == t[0]).all() and T_MIN <= t[0] < 1
    assert np.array_equal(t, np.array(sample_t(8, "batch", key=key)))
    assert not np.array_equal(t, np.array(sample_t(8, "batch", key=mx.random.key(5))))
    u = np.array(sample_t(8, "uniform", key=key))
    assert sorted(np.floor((u - T_MIN) / (1 - T_MIN) * 8).astype(int)) != list(range(8))
    with pytest.raises(ValueError, match="unknown t sampling 'sorted' \\(choose from stratified, uniform, batch\\)"):
        sample_t(8, "sorted")


def test_corrupt_keeps_the_token_dtype():
    tokens = mx.array(np.arange(40, dtype=np.uint16).reshape(2, 20) + 1)
    noisy, hidden = corrupt(tokens, mx.array([0.5, 0.5]), mask_id=0, key=mx.random.key(0))
    assert noisy.dtype == mx.uint16 and hidden.dtype == mx.bool_


def test_diffusion_loss_passes_t_sampling_and_draws_from_the_random_state_without_a_key():
    seen = []

    def spy_model(noisy, t):
        seen.append(np.array(t))
        return mx.zeros((*noisy.shape, 5))

    tokens = mx.ones((8, 16), dtype=mx.int32)
    diffusion_loss(spy_model, tokens, mask_id=0, t_sampling="batch", key=mx.random.key(1))
    assert (seen[-1] == seen[-1][0]).all()
    diffusion_loss(spy_model, tokens, mask_id=0, t_sampling="stratified", key=mx.random.key(1))
    assert sorted(np.floor((seen[-1] - T_MIN) / (1 - T_MIN) * 8).astype(int)) == list(range(8))
    mx.random.seed(3)
    first = float(diffusion_loss(spy_model, tokens, mask_id=0))
    second = float(diffusion_loss(spy_model, tokens, mask_id=0))
    mx.random.seed(3)
    assert float(diffusion_loss(spy_model, tokens, mask_id=0)) == first and second != first


def test_unknown_loss_names_the_choices():
    ce = mx.zeros((1, 4, 5))
    with pytest.raises(ValueError, match="unknown loss 'mse' \\(choose from elbo, masked-mean\\)"):
        masked_loss(ce, mx.zeros((1, 4), dtype=mx.int32), mx.ones((1, 4), dtype=mx.bool_), mx.array([0.5]), "mse")
