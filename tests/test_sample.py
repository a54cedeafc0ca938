import mlx.core as mx
import numpy as np
import pytest

import mlx_dlm
from mlx_dlm.errors import UserError
from mlx_dlm.sample import commit_schedule, stream_generate

from conftest import untrained, user_error
from reference import forward, softmax


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return mlx_dlm.load(tiny_model_dir)


@pytest.mark.parametrize("n,steps", [(128, 16), (64, 7), (5, 5), (100, 1)])
def test_commit_schedule(n, steps):
    counts = commit_schedule(n, steps)
    assert len(counts) == steps and sum(counts) == n and min(counts) >= 1
    assert max(counts) - min(counts) <= 1  # linear: as even as integers allow


@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_invariants(tiny, strategy):
    model, tok = tiny
    prompt = "ROMEO:"
    states = list(stream_generate(model, tok, prompt, max_tokens=50, steps=8, strategy=strategy, seed=3))
    assert len(states) == 8 and states[-1].nfe == 8
    p = len(tok.encode(prompt))
    schedule = commit_schedule(50, 8)
    masked_before = np.ones(p + 50, bool)
    masked_before[:p] = False
    for state, count in zip(states, schedule):
        row = state.tokens[0]
        assert row[:p].tolist() == tok.encode(prompt)  # prompt never changes
        assert state.committed[0].sum() == count  # exactly the scheduled number per step
        assert not state.committed[0, :p].any()
        assert (masked_before[state.committed[0]]).all()  # commits only hidden positions
        masked_before = row == tok.mask_id
    final = states[-1].tokens[0]
    assert (final != tok.mask_id).all()  # every position filled
    text = tok.decode(final)
    assert text.startswith(prompt) and len(text) == len(prompt) + 50


def test_same_seed_same_text(tiny):
    model, tok = tiny
    a = mlx_dlm.generate(model, tok, "KING", max_tokens=40, steps=10, seed=7)
    b = mlx_dlm.generate(model, tok, "KING", max_tokens=40, steps=10, seed=7)
    c = mlx_dlm.generate(model, tok, "KING", max_tokens=40, steps=10, seed=8)
    assert a == b and a != c


def test_confidence_commits_most_probable_positions(tiny):
    """Greedy first step, checked against a numpy forward: the committed set is the top-k by max probability."""
    model, tok = tiny
    p_ids = tok.encode("First")
    n, steps = 30, 6
    first = next(iter(stream_generate(model, tok, "First", max_tokens=n, steps=steps, temp=0.0, seed=0)))
    canvas = np.array([p_ids + [tok.mask_id] * n])
    t = np.array([n / (len(p_ids) + n)])
    logits = forward(model, canvas, t)[0]
    logits[:, tok.mask_id] = -np.inf
    conf = softmax(logits).max(-1)[len(p_ids):]
    k = commit_schedule(n, steps)[0]
    want = set((np.argsort(-conf)[:k] + len(p_ids)).tolist())
    got = set(np.flatnonzero(first.committed[0]).tolist())
    assert got == want
    committed_ids = first.tokens[0][sorted(got)]
    np.testing.assert_array_equal(committed_ids, logits[sorted(got)].argmax(-1))


def test_no_prompt_means_an_all_masked_canvas(tiny):
    model, tok = tiny
    first = next(stream_generate(model, tok, max_tokens=6, seed=0))
    assert first.editable.tolist() == [True] * 6 and first.prompt_tokens == 0


def test_steps_clamped_to_canvas(tiny):
    model, tok = tiny
    states = list(stream_generate(model, tok, "", max_tokens=4, steps=32, seed=0))
    assert len(states) == 4 and all(s.committed.sum() == 1 for s in states)


def test_errors(tiny):
    model, tok = tiny
    with pytest.raises(UserError, match="exceeds the model's context of 256"):
        mlx_dlm.generate(model, tok, "A" * 200, max_tokens=57)
    assert len(mlx_dlm.generate(model, tok, "A" * 200, max_tokens=56, steps=1)) == 256  # exactly the context fits
    with pytest.raises(UserError, match="'@'"):
        mlx_dlm.generate(model, tok, "hi @ there", max_tokens=10)
    with pytest.raises(UserError, match="unknown strategy"):
        mlx_dlm.generate(model, tok, "", max_tokens=10, strategy="best")
    with pytest.raises(UserError, match="--steps"):
        mlx_dlm.generate(model, tok, "", max_tokens=10, steps=0)


def test_all_stopped_matches_numpy_row_by_row():
    """True only when every row holds one of the stop ids at one of the given positions."""
    from mlx_dlm.decoding import all_stopped

    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.integers(0, 6, size=(rng.integers(1, 4), 9)).astype(np.int32)
        positions = np.sort(rng.choice(9, size=rng.integers(1, 5), replace=False))
        stop_ids = sorted(set(rng.integers(0, 6, size=rng.integers(1, 4)).tolist()))
        want = bool(np.isin(x[:, positions], stop_ids).any(axis=1).all())
        assert all_stopped(mx.array(x), stop_ids, positions) == want, (x, positions, stop_ids)


def test_completion_reports_why_it_ended():
    """OpenAI's finish_reason: "stop" when a stop token cut the text, "length" when the canvas ran out."""
    from mlx_dlm.sample import GenerationStep, completion

    class Tok:
        stop_ids = (9,)

        def decode(self, ids):
            return "".join("abcdefgh"[i] for i in ids)

    editable = np.array([False, False, True, True, True, True])
    none = np.zeros((1, 6), bool)

    def step(row):
        return GenerationStep(1, np.array([row]), editable, none, none, 4, 1, 6, 0.0, 0.0, 0)

    assert completion(Tok(), step([0, 1, 2, 9, 3, 4])) == ("c", "stop")
    assert completion(Tok(), step([0, 1, 2, 3, 4, 5])) == ("cdef", "length")


def test_fill_with_nothing_to_fill_returns_the_canvases(tiny):
    from mlx_dlm.sample import fill

    model, tok = tiny
    canvases = np.array([tok.encode("ROMEO: "), tok.encode("JULIET:")], dtype=np.int32)
    out = fill(model, tok.mask_id, canvases, np.zeros(canvases.shape[1], bool), steps=4)
    np.testing.assert_array_equal(out, canvases)


def _untrained():
    return untrained("ROMEO: O, she doth teach JULIET: Good night", 32, seed=2)


def test_fill_in_one_step_is_one_forward_argmax_and_samples_above_temp_0():
    """fill commits every position from one pass of the whole canvas (no blocks, no top-k at temp > 0)."""
    from mlx_dlm.sample import fill

    model, tok = _untrained()
    canvases = np.array([tok.encode(s) for s in ("ROMEO: O, she doth teach", "JULIET: Good night, good")],
                        dtype=np.int32)
    editable = np.zeros(canvases.shape[1], bool)
    editable[7:19] = True
    greedy = fill(model, tok.mask_id, canvases, editable, steps=1)
    masked = np.where(editable, tok.mask_id, canvases)
    logits = forward(model, masked, np.full(len(canvases), editable.mean(), np.float32))
    logits[..., tok.mask_id] = -np.inf
    np.testing.assert_array_equal(greedy, np.where(editable, logits.argmax(-1), canvases))
    sampled = [fill(model, tok.mask_id, canvases, editable, steps=1, temp=1.0, seed=s) for s in range(3)]
    np.testing.assert_array_equal(sampled[0], fill(model, tok.mask_id, canvases, editable, steps=1, temp=1.0))
    assert all((s[:, ~editable] == canvases[:, ~editable]).all() for s in sampled)
    assert any((s != greedy).any() for s in sampled)  # temp 1 draws from the distribution, not its argmax


def test_fill_one_position_per_step_follows_confidence_like_numpy():
    """steps = positions: each step commits the argmax at the masked position the model is surest of
    (LLaDA's low-confidence remasking), recomputed in float64 numpy from the canvas so far."""
    from mlx_dlm.sample import fill

    model, tok = _untrained()
    canvases = np.array([tok.encode(s) for s in ("ROMEO: O, she doth", "JULIET: Good night")], dtype=np.int32)
    editable = np.zeros(canvases.shape[1], bool)
    editable[[3, 6, 7, 8, 12, 15]] = True
    x = np.where(editable, tok.mask_id, canvases)
    for _ in range(editable.sum()):
        hidden = x == tok.mask_id
        logits = forward(model, x, hidden.mean(axis=1).astype(np.float32)).astype(np.float64)
        logits[..., tok.mask_id] = -np.inf
        p = softmax(logits)
        where = np.where(hidden, p.max(-1), -1.0).argmax(axis=1)
        rows = np.arange(len(x))
        x[rows, where] = p[rows, where].argmax(-1)
    np.testing.assert_array_equal(fill(model, tok.mask_id, canvases, editable, steps=int(editable.sum())), x)


def test_top_k_or_top_p_keeping_only_the_argmax_sample_greedily():
    model, tok = _untrained()
    greedy = mlx_dlm.generate(model, tok, "ROMEO:", max_tokens=12, steps=4, temp=0.0)
    for top_k, top_p in [(1, 1.0), (0, 1e-6)]:
        assert mlx_dlm.generate(model, tok, "ROMEO:", max_tokens=12, steps=4, temp=1.0, top_k=top_k, top_p=top_p,
                                seed=3) == greedy, (top_k, top_p)
    assert mlx_dlm.generate(model, tok, "ROMEO:", max_tokens=12, steps=4, temp=1.0, seed=3) != greedy


def test_build_canvas_refusals_and_edges(tiny):
    from mlx_dlm.sample import build_canvas

    _, tok = tiny
    for prompt, suffix in [("A", ""), ("", "B"), ("A", "B")]:
        assert user_error(build_canvas, tok, prompt, 8, suffix, template="x[MASK]") == \
            "pass either a template or a prompt/suffix, not both"
    assert user_error(build_canvas, tok, "A", 0) == "--max-tokens must be at least 1, got 0"
    ids, editable = build_canvas(tok, "A", 1, "B")
    assert ids.tolist() == [*tok.encode("A"), tok.mask_id, *tok.encode("B")] and editable.tolist() == [False, True, False]
    assert ids.dtype == np.int32


def test_random_strategy_commits_in_an_order_drawn_per_seed(tiny):
    """simple_dlm's random order: where the first commit lands varies with the seed and is fixed by it."""
    model, tok = tiny
    firsts = [int(np.flatnonzero(next(stream_generate(model, tok, "A", max_tokens=16, steps=16, strategy="random",
                                                      temp=0.0, seed=seed)).committed[0])[0]) for seed in range(8)]
    assert len(set(firsts)) >= 3 and firsts[0] == int(np.flatnonzero(next(stream_generate(
        model, tok, "A", max_tokens=16, steps=16, strategy="random", temp=0.0, seed=0)).committed[0])[0])


@pytest.mark.parametrize("kind, options", [
    ("dlm", dict(temp=0.6, top_p=0.9)), ("dlm", dict(temp=0.8, threshold=0.5)), ("dlm", dict(temp=1.0, alg_temp=0.3)),
    ("ar", dict(temp=0.6, top_p=0.9))], ids=["dlm-top-p", "dlm-threshold", "dlm-alg-temp", "ar-top-p"])
def test_plain_number_options_are_inputs_not_compile_keys(kind, options, tiny_model_dir, tiny_ar_dir):
    """A new temperature, top_p, threshold or alg_temp reuses the compiled step (no new memo entry), and gives
    exactly what a model that compiled for that value alone gives (the value is an input, not a baked constant)."""
    from mlx_dlm.io import load
    from mlx_dlm.model import MEMO_ATTRIBUTE

    model, tok = load(tiny_ar_dir if kind == "ar" else tiny_model_dir)
    first = {k: v / 2 for k, v in options.items()}
    mlx_dlm.generate(model, tok, "AB", max_tokens=12, steps=6, seed=3, **first)
    entries = len(getattr(model, MEMO_ATTRIBUTE))
    reused = mlx_dlm.generate(model, tok, "AB", max_tokens=12, steps=6, seed=3, **options)
    assert len(getattr(model, MEMO_ATTRIBUTE)) == entries
    fresh_model, _ = load(tiny_ar_dir if kind == "ar" else tiny_model_dir)
    assert reused == mlx_dlm.generate(fresh_model, tok, "AB", max_tokens=12, steps=6, seed=3, **options)


def test_ahead_builds_the_next_step_before_yielding_one():
    """`decoding.ahead` yields every item in order, each only after the next has been built (and handed to the
    device), so the host's work on a step overlaps the device's on the next; the last comes once the steps end."""
    from mlx_dlm.decoding import ahead

    events = []

    def steps():
        for i in range(4):
            events.append(("built", i))
            yield mx.array(i) * 2, i

    for value, i in ahead(steps()):
        events.append(("read", i))
        assert value.item() == 2 * i
    assert events == [("built", 0), ("built", 1), ("read", 0), ("built", 2), ("read", 1), ("built", 3), ("read", 2),
                      ("read", 3)]
    assert list(ahead(iter(()))) == []
