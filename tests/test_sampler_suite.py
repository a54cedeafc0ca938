"""Sampler suite: strategies, schedules, threshold, blocks and cache, remasking, infilling, live view."""

import importlib
import io
import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_dlm
from mlx_dlm.errors import UserError
from mlx_dlm.sample import STRATEGIES, build_canvas, commit_schedule, stream_generate
from mlx_dlm.view import TerminalView, save_frames

from conftest import untrained, user_error
from reference import forward, softmax

generate_cli = importlib.import_module("mlx_dlm.generate")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return mlx_dlm.load(tiny_model_dir)


def _run(model, tok, prompt="ROMEO:", **options):
    return list(stream_generate(model, tok, prompt, **options))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_each_strategy_commits_the_scheduled_count(tiny, strategy, schedule):
    model, tok = tiny
    states = _run(model, tok, max_tokens=40, steps=9, strategy=strategy, schedule=schedule, seed=1, num_samples=2)
    counts = commit_schedule(40, 9, schedule)
    assert [int(s.committed[0].sum()) for s in states] == counts
    assert [int(s.committed[1].sum()) for s in states] == counts
    assert (states[-1].tokens != tok.mask_id).all()


def test_cosine_schedule_shape():
    import math

    # MaskGIT's closed form: floor(n cos(pi k / 2K)) positions stay masked after step k.
    remaining = [math.floor(100 * math.cos(math.pi * k / 20)) for k in range(11)]
    assert commit_schedule(100, 10, "cosine") == [remaining[k] - remaining[k + 1] for k in range(10)]
    assert commit_schedule(100, 10, "linear") == [10] * 10
    # 12 in 10 steps: the closed form leaves 12, 11, 11, 10, 9, 8, 7, 5, 3, 1, 0 masked (step 2 would commit
    # nothing); one commit where it commits none pushes the rest along until the form overtakes it again.
    assert commit_schedule(12, 10, "cosine") == [1, 1, 1, 1, 1, 1, 1, 2, 2, 1]


def _first_step_reference(model, tok, prompt, n):
    ids = tok.encode(prompt)
    logits = forward(model, np.array([ids + [tok.mask_id] * n]), np.array([n / (len(ids) + n)]))[0][len(ids):]
    logits[:, tok.mask_id] = -np.inf
    return softmax(logits), len(ids)


@pytest.mark.parametrize("strategy", ["margin", "entropy"])
def test_margin_and_entropy_order_against_numpy(tiny, strategy):
    model, tok = tiny
    probs, p = _first_step_reference(model, tok, "First", 24)
    if strategy == "margin":
        top = np.sort(probs, axis=-1)
        score = top[:, -1] - top[:, -2]
    else:
        score = (probs * np.log(np.where(probs > 0, probs, 1))).sum(-1)  # -entropy
    k = commit_schedule(24, 2)[0]  # half the positions: the boundary of the order matters, not only its top
    first = _run(model, tok, "First", max_tokens=24, steps=2, strategy=strategy, temp=0.0, seed=0)[0]
    assert set(np.flatnonzero(first.committed[0]) - p) == set(np.argsort(-score)[:k].tolist())


def test_threshold_commits_every_confident_position(tiny):
    model, tok = tiny
    probs, p = _first_step_reference(model, tok, "First", 30)
    best = probs.max(-1)
    P = float(np.sort(best)[-4]) - 1e-6  # a threshold that four positions reach
    first = _run(model, tok, "First", max_tokens=30, threshold=P, temp=0.0, seed=0)[0]
    assert set(np.flatnonzero(first.committed[0]) - p) == set(np.flatnonzero(best >= P).tolist())
    states = _run(model, tok, max_tokens=30, threshold=0.999999, seed=0)
    assert all(s.committed.sum() >= 1 for s in states) and (states[-1].tokens != tok.mask_id).all()
    assert len(states) <= 30
    assert len(_run(model, tok, max_tokens=30, threshold=1e-9, seed=0)) == 1  # everything at once


def test_prompt_and_suffix_are_kept(tiny):
    model, tok = tiny
    text = mlx_dlm.generate(model, tok, "ROMEO:", suffix=" thee.", max_tokens=20, steps=5, seed=2)
    assert text.startswith("ROMEO:") and text.endswith(" thee.") and len(text) == 6 + 20 + 6
    assert "[MASK]" not in text


def test_template_fills_only_placeholders(tiny):
    model, tok = tiny
    template = "To be, or [MASK][MASK][MASK] to be: that is the [MASK][MASK][MASK][MASK]."
    ids, editable = build_canvas(tok, template=template)
    assert editable.sum() == 7
    text = mlx_dlm.generate(model, tok, template=template, steps=7, seed=3)
    assert text.startswith("To be, or ") and text[13:] .startswith(" to be: that is the ") and text.endswith(".")
    assert len(text) == len(template) - 7 * (len("[MASK]") - 1) and "[MASK]" not in text
    with pytest.raises(UserError, match="no \\[MASK\\] placeholder"):
        mlx_dlm.generate(model, tok, template="nothing to fill")


def test_same_seed_same_output_with_every_option(tiny):
    model, tok = tiny
    opts = dict(max_tokens=32, steps=8, strategy="margin", schedule="cosine", block_length=8, cache=True,
                remask=0.2, top_k=10, top_p=0.9, seed=11, num_samples=3)
    a = mlx_dlm.generate(model, tok, "KING", **opts)
    b = mlx_dlm.generate(model, tok, "KING", **opts)
    assert a == b and len(a) == 3 and len(set(a)) > 1  # samples of one batch differ


def test_remask_zero_is_the_plain_sampler_and_remask_revises(tiny):
    model, tok = tiny
    plain = _run(model, tok, max_tokens=40, steps=10, seed=4)
    zero = _run(model, tok, max_tokens=40, steps=10, seed=4, remask=0.0)
    assert all((a.tokens == b.tokens).all() for a, b in zip(plain, zero))
    revised = _run(model, tok, max_tokens=40, steps=10, seed=4, remask=0.3)
    p = len(tok.encode("ROMEO:"))
    assert sum(int(s.remasked.sum()) for s in revised) > 0
    assert not any(s.remasked[:, :p].any() for s in revised)  # never the given text
    assert not revised[-1].remasked.any() and (revised[-1].tokens != tok.mask_id).all()
    assert (revised[-1].tokens[:, :p] == tok.encode("ROMEO:")).all()


def test_remask_hides_the_fraction_r_of_each_samples_earlier_tokens(tiny):
    """Each step but the last re-masks floor(R x the tokens committed before it) in every sample, counted per
    sample; a step commits only masked positions, and given text is never hidden."""
    model, tok = tiny
    states = _run(model, tok, max_tokens=20, steps=10, remask=0.3, seed=2, num_samples=3)
    editable = states[0].editable
    decided_before = np.zeros(3, dtype=int)
    for k, s in enumerate(states):
        want = np.zeros(3, int) if k == len(states) - 1 else np.floor(0.3 * decided_before + 1e-9).astype(int)
        assert s.remasked.sum(axis=1).tolist() == want.tolist(), k
        decided_before = ((s.tokens != tok.mask_id) & editable).sum(axis=1)
        assert not (s.remasked & s.committed).any() and not s.remasked[:, ~editable].any()


def test_threshold_one_commits_every_certain_position_at_once():
    """--threshold P commits every proposal with probability >= P: at P = 1, exactly the certain ones."""
    model, tok = untrained("ROMEO: abcdefghijklmnopqrstuvwxyz", 32)
    bias = np.zeros(model.args.vocab_size, np.float32)
    bias[tok.encode("e")[0]] = 100.0  # softmax rounds its probability to exactly 1 in float32
    model.lm_head.bias = mx.array(bias)
    states = _run(model, tok, max_tokens=8, threshold=1.0, temp=0.0, seed=0)
    assert len(states) == 1 and states[0].committed[0, 6:].all() and tok.decode(states[0].tokens[0, 6:]) == "e" * 8


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_steps_read_this_generations_cache(tiny_model_dir, cache):
    """A model that already generated (its compiled cached steps kept) gives another prompt the same text as a
    freshly loaded copy: the steps read the cache this generation wrote, not the one they were first traced with."""
    opts = dict(max_tokens=24, steps=12, block_length=8, seed=2, cache=cache, cache_refresh=2)
    used, tok = mlx_dlm.load(tiny_model_dir)
    mlx_dlm.generate(used, tok, "ROMEO:", **opts)
    fresh, _ = mlx_dlm.load(tiny_model_dir)
    assert mlx_dlm.generate(used, tok, "KING H", **opts) == mlx_dlm.generate(fresh, tok, "KING H", **opts)


def test_blocks_fill_left_to_right(tiny):
    model, tok = tiny
    states = _run(model, tok, "", max_tokens=32, steps=8, block_length=8, seed=5)
    assert len(states) == 8
    for k, s in enumerate(states):  # two steps per block: block k // 2 only
        block = k // 2
        assert s.committed[0, block * 8:(block + 1) * 8].sum() == s.committed[0].sum()


def test_cache_refreshed_every_step_equals_uncached_and_saves_work(tiny):
    model, tok = tiny
    opts = dict(max_tokens=48, steps=12, block_length=16, seed=6, num_samples=2)
    plain = _run(model, tok, **opts)
    refreshed = _run(model, tok, cache=True, cache_refresh=1, **opts)
    cached = _run(model, tok, cache=True, **opts)
    assert all((a.tokens == b.tokens).all() for a, b in zip(plain, refreshed))
    assert refreshed[-1].forward_tokens == plain[-1].forward_tokens
    assert cached[-1].forward_tokens < 0.75 * plain[-1].forward_tokens  # fewer positions through the model
    assert (cached[-1].tokens != tok.mask_id).all()


def test_option_errors(tiny):
    model, tok = tiny
    for options, message in [(dict(cache=True), "--cache needs --block-length"),
                             (dict(threshold=0.9, remask=0.1), "cannot be combined"),
                             (dict(threshold=1.5), "--threshold must be in"),
                             (dict(remask=1.0), "--remask must be in"),
                             (dict(strategy="best"), "unknown strategy"),
                             (dict(schedule="exp"), "unknown schedule")]:
        with pytest.raises(UserError, match=message):
            mlx_dlm.generate(model, tok, "A", max_tokens=8, **options)
    assert user_error(mlx_dlm.generate, model, tok, "A", max_tokens=8, schedule="exp") == \
        "unknown schedule 'exp' (choose from linear, cosine)"


# Every option at the last value it accepts and the first it refuses, with the whole one-line message.
_DEFAULTS = dict(steps=1, temp=0.0, top_k=0, top_p=1.0, num_samples=1, strategy="confidence", threshold=None,
                 remask=0.0, block_length=0, cache=False, cache_refresh=0, alg_temp=0.0, cfg_scale=0.0)
_ACCEPTED = [dict(steps=1), dict(temp=0.0), dict(top_k=0, top_p=1.0), dict(top_p=1e-6), dict(num_samples=1),
             *[dict(strategy=s) for s in STRATEGIES], dict(threshold=1.0), dict(threshold=1e-6),
             dict(remask=0.0), dict(remask=0.99), dict(block_length=0, cache_refresh=0), dict(alg_temp=0.0),
             dict(cfg_scale=0.5), dict(cache="dual", block_length=4), dict(cache=True, block_length=4),
             dict(cache="prefix", block_length=4, cache_refresh=2), dict(block_steps=0), dict(block_steps=1)]
_REFUSED = [(dict(steps=0), "--steps must be at least 1, got 0"),
            (dict(temp=-0.1), "--temp must be >= 0, got -0.1"),
            (dict(top_k=-1), "--top-k must be >= 0 and --top-p in (0, 1]"),
            (dict(top_p=0.0), "--top-k must be >= 0 and --top-p in (0, 1]"),
            (dict(top_p=1.01), "--top-k must be >= 0 and --top-p in (0, 1]"),
            (dict(num_samples=0), "--num-samples must be at least 1, got 0"),
            (dict(strategy="best"), "unknown strategy 'best' (choose from confidence, margin, entropy, random, left)"),
            (dict(threshold=0.0), "--threshold must be in (0, 1], got 0.0"),
            (dict(threshold=1.01), "--threshold must be in (0, 1], got 1.01"),
            (dict(remask=-0.1), "--remask must be in [0, 1), got -0.1"),
            (dict(remask=1.0), "--remask must be in [0, 1), got 1.0"),
            (dict(remask=0.1, threshold=0.9), "--remask needs a step schedule: it cannot be combined with --threshold"),
            (dict(block_length=-1), "--block-length and --cache-refresh must be >= 0"),
            (dict(cache_refresh=-1), "--block-length and --cache-refresh must be >= 0"),
            (dict(block_steps=-1), "--block-steps must be >= 0, got -1"),
            (dict(alg_temp=-0.1), "--alg-temp and --cfg-scale must be >= 0"),
            (dict(cfg_scale=-0.1), "--alg-temp and --cfg-scale must be >= 0"),
            (dict(cfg_scale=1.0, cache="prefix", block_length=4),
             "--cfg-scale needs the whole canvas in both passes: it does not combine with --cache"),
            (dict(cache="full", block_length=4), "--cache must be prefix or dual, got 'full'"),
            (dict(cache="dual"), "--cache needs --block-length (the cache holds the blocks before the current one)")]


def test_option_bounds_and_messages():
    from mlx_dlm.options import SamplerOptions

    for accepted in _ACCEPTED:
        options = SamplerOptions(**{**_DEFAULTS, **accepted})
        assert options.check() is options
    for refused, message in _REFUSED:
        assert user_error(SamplerOptions(**{**_DEFAULTS, **refused}).check) == message, refused


def test_options_refuse_wrong_types_and_non_finite_numbers():
    """What a JSON body or a Python caller can pass that a flag cannot: bools for numbers, NaN, strings."""
    from mlx_dlm.options import SamplerOptions

    for refused, message in [(dict(steps=True), "--steps has the wrong type (bool)"),
                             (dict(temp="hot"), "--temp has the wrong type (str)"),
                             (dict(temp=float("nan")), "--temp must be a finite number, got nan"),
                             (dict(alg_temp=float("inf")), "--alg-temp must be a finite number, got inf"),
                             (dict(threshold=float("nan")), "--threshold must be a finite number, got nan"),
                             (dict(cache=1, block_length=4), "--cache has the wrong type (int)"),
                             (dict(seed=-1), "--seed must be in [0, 2^64), got -1"),
                             (dict(seed=2**64), f"--seed must be in [0, 2^64), got {2**64}"),
                             (dict(max_tokens=0), "--max-tokens must be at least 1, got 0"),
                             (dict(schedule="fast"), "unknown schedule 'fast' (choose from linear, cosine)")]:
        assert user_error(SamplerOptions(**refused).check) == message, refused
    assert SamplerOptions(seed=2**64 - 1, temp=1, steps=np.int64(3), top_p=np.float32(0.5)).check()


def test_options_from_flags_and_keywords_agree(tiny):
    """The CLI's parsed flags and the API's keywords build the same options, and the same text."""
    from mlx_dlm.generate import setup_arg_parser
    from mlx_dlm.options import SamplerOptions
    from mlx_dlm.sample import generate

    args = setup_arg_parser().parse_args(["--steps", "3", "--temp", "0.5", "--max-tokens", "9", "--seed", "4",
                                          "--strategy", "margin", "--block-length", "3", "--cache", "dual"])
    options = SamplerOptions.from_namespace(args)
    assert options == SamplerOptions(steps=3, temp=0.5, max_tokens=9, seed=4, strategy="margin", block_length=3,
                                     cache="dual")
    model, tok = tiny
    assert generate(model, tok, "AB", options) == generate(model, tok, "AB", steps=3, temp=0.5, max_tokens=9, seed=4,
                                                            strategy="margin", block_length=3, cache="dual")


def test_live_view_and_frames(tiny, tiny_model_dir, tmp_path, capsys):
    model, tok = tiny
    states = _run(model, tok, max_tokens=12, steps=3, seed=0)
    plain = TerminalView(tok, io.StringIO())
    plain.draw(states[0])
    assert plain.stream.getvalue().startswith("--- step 1:") and "\u2591" in plain.stream.getvalue()

    class Tty(io.StringIO):
        def isatty(self):
            return True

    live = TerminalView(tok, Tty())
    live.draw(states[0])
    live.draw(states[1])
    live.close()
    out = live.stream.getvalue()
    assert "\x1b[1;32m" in out and out.count("\x1b[H\x1b[J") == 2  # highlighted commits, each frame from the top
    assert out.startswith("\x1b[?1049h") and out.endswith("\x1b[?1049l")  # in the alternate screen, then back

    generate_cli.main(["--model", str(tiny_model_dir), "--prompt", "ROMEO:", "--suffix", " thee.",
                       "--max-tokens", "64", "--threshold", "0.9", "--show", "--save-frames",
                       str(tmp_path / "f.html"), "--seed", "0"])
    captured = capsys.readouterr()
    printed = captured.out
    n_frames = printed.count("--- step")
    assert n_frames >= 1 and "Generation: 64 tokens" in printed and f"{n_frames} forward passes" in printed
    assert f"Saved {n_frames} frames to {tmp_path / 'f.html'}" in captured.err
    before = printed.split("\n==========\n")[0]  # frames, then the final text (which may hold newlines)
    text = before[before.rindex("\nROMEO:") + 1:]
    assert text.endswith(" thee.") and "\u2591" not in text  # prompt, filled middle, suffix
    html = (tmp_path / "f.html").read_text()
    frames = json.loads(html.split("const frames = ")[1].split(";\n")[0])
    assert len(frames) == n_frames and 'class="new"' in frames[0] and 'class="given"' in frames[-1]
    with pytest.raises(UserError, match="use a .html or .gif"):
        save_frames(tmp_path / "f.txt", states, tok)


def test_dual_cache_refreshed_every_step_equals_uncached_and_runs_only_the_block(tiny):
    model, tok = tiny
    opts = dict(max_tokens=48, steps=12, block_length=16, seed=6, num_samples=2)  # 3 blocks of 4 steps
    plain = _run(model, tok, **opts)
    refreshed = _run(model, tok, cache="dual", cache_refresh=1, **opts)
    dual = _run(model, tok, cache="dual", **opts)
    prefix = _run(model, tok, cache=True, **opts)
    assert all((a.tokens == b.tokens).all() for a, b in zip(plain, refreshed))
    L = len("ROMEO:") + 48
    # Per block: one full pass at its start, then 3 passes over the block alone (dual) or from it to the end (prefix).
    assert dual[-1].forward_tokens == 2 * 3 * (L + 3 * 16)
    assert prefix[-1].forward_tokens == 2 * sum(L + 3 * (L - start) for start in (6, 22, 38))
    assert (dual[-1].tokens != tok.mask_id).all()


class _StopAt:
    """A stand-in model: the eot token wins at canvas positions >= `at`, token 5 before."""

    def __init__(self, vocab: int, eot: int, at: int):
        from mlx_dlm.model import ModelArgs

        self.args = ModelArgs(vocab_size=vocab, dim=8, n_layers=1, hidden_dim=8, max_seq_len=64, pos_emb="rope",
                              time_cond=False)
        self.state, self.vocab, self.eot, self.at = [], vocab, eot, at

    def __call__(self, tokens, t=None, cache=None):
        B, L = tokens.shape
        favourite = mx.where(mx.arange(L)[None, :, None] >= self.at, self.eot, 5)
        return mx.broadcast_to(mx.where(mx.arange(self.vocab)[None, None] == favourite, 10.0, 0.0), (B, L, self.vocab))


def test_generation_stops_at_the_block_holding_eot_and_cuts_the_text():
    from mlx_dlm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh|")
    tok.stop_ids = [tok.encode("|")[0]]
    model = _StopAt(tok.vocab_size, tok.stop_ids[0], at=2 + 10)  # position 10 of the generated text: block 2 of 3
    states = list(stream_generate(model, tok, "ab", max_tokens=24, steps=24, block_length=8, temp=0.0, seed=0))
    assert states[-1].nfe == 16  # blocks 1 and 2, one token per pass; block 3 never runs
    assert (states[-1].tokens[0, 2 + 16:] == tok.mask_id).all()
    five = tok.decode([5])
    assert mlx_dlm.generate(model, tok, "ab", max_tokens=24, steps=24, block_length=8, temp=0.0, seed=0) == \
        "ab" + five * 10


@pytest.mark.parametrize("scale", [0.5, 1.5, 3.0])
def test_cfg_step_matches_two_plain_forwards(scale):
    """Guidance (LLaDA): logits = uncond + (s + 1)(cond - uncond), the unconditional pass with the given text masked
    too. One step commits every position at the guided argmax; eight commit the most confident first."""
    model, tok = untrained("ROMEO: abcdefghijklmnopqrstuvwxyz", 32)
    ids = np.array(tok.encode("ROMEO:") + [tok.mask_id] * 8)
    uncond = np.where(np.arange(14) < 6, tok.mask_id, ids)
    cond_l = np.array(model(mx.array(ids[None]), mx.array([8 / 14])), dtype=np.float64)[0]
    unc_l = np.array(model(mx.array(uncond[None]), mx.array([14 / 14])), dtype=np.float64)[0]
    logits = unc_l + (scale + 1) * (cond_l - unc_l)
    logits[:, tok.mask_id] = -np.inf
    guided = logits.argmax(-1)
    cond_l[:, tok.mask_id] = -np.inf
    assert (guided[6:] != cond_l[6:].argmax(-1)).any()  # guidance changes some of the picks
    one = _run(model, tok, max_tokens=8, steps=1, temp=0.0, cfg_scale=scale, seed=0)[0]
    assert one.tokens[0, 6:].tolist() == guided[6:].tolist() and one.forward_tokens == 2 * 14  # two passes a step
    first = _run(model, tok, max_tokens=8, steps=8, temp=0.0, cfg_scale=scale, seed=0)[0]
    best = 6 + int(np.argmax(softmax(logits)[6:].max(-1)))
    assert np.flatnonzero(first.committed[0]).tolist() == [best] and first.tokens[0, best] == guided[best]


def test_alg_temp_limits(tiny):
    model, tok = tiny
    opts = dict(max_tokens=16, steps=16, temp=0.0)
    order = lambda states: [int(np.flatnonzero(s.committed[0])[0]) for s in states]  # noqa: E731
    assert order(_run(model, tok, alg_temp=1e-6, seed=0, **opts)) == order(_run(model, tok, seed=0, **opts))
    firsts = {order(_run(model, tok, alg_temp=1e3, seed=k, **opts))[0] for k in range(12)}
    assert len(firsts) >= 5  # near-uniform choice of where to start, where confidence order always starts alike
    with pytest.raises(UserError, match="does not combine with --cache"):
        _run(model, tok, cfg_scale=1.0, block_length=8, cache="dual", **opts)


def test_alg_temp_draws_where_to_commit_from_the_softmax_of_confidence():
    """Dream's alg_temp: the first position committed is a draw from softmax(confidence / alg_temp). 4,000 samples
    (one batch) of an untrained model's first step against that distribution computed from one forward."""
    model, tok = untrained("ROMEO: abcdefghijklmnopqrstuvwxyz", 32)
    prob, _ = _first_step_reference(model, tok, "ROMEO:", 8)
    confidence = prob.max(-1)
    weights = np.exp((confidence - confidence.max()) / 0.02)
    first = _run(model, tok, max_tokens=8, steps=8, temp=0.0, alg_temp=0.02, seed=0, num_samples=4000)[0]
    assert (first.committed.sum(axis=1) == 1).all()
    drawn = np.bincount(first.committed[:, 6:].argmax(axis=1), minlength=8) / 4000
    assert 0.5 * np.abs(drawn - weights / weights.sum()).sum() < 0.05  # total variation (0.01 measured)


def _greedy_reference(model, tok, prompt, max_tokens, steps, block_length=None, cache=None, remask=0.0):
    """Canvases after each step from tests/reference.py's float64 greedy decoder, with the sampler's schedule."""
    from reference import greedy_decode

    ids, editable = build_canvas(tok, prompt, max_tokens)
    n = int(editable.sum())
    size = block_length or n
    blocks = [min(size, n - i) for i in range(0, n, size)]
    per_block = max(1, steps // len(blocks))
    targets = []
    for length in blocks:
        counts = commit_schedule(length, min(per_block, length))
        targets.append([length - sum(counts[:j + 1]) for j in range(len(counts))])
    return greedy_decode(model, ids, editable, tok.mask_id, targets, block_length, cache, remask)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_steps_reuse_stale_keys_exactly_as_the_reference(tiny, cache):
    """Steps that reuse cached keys/values match a float64 forward fed the stale keys/values of the block's
    first pass (and differ from a full recomputation, so reuse is what is checked)."""
    model, tok = tiny
    opts = dict(max_tokens=24, steps=12, block_length=12)  # 2 blocks of 6 steps
    got = [s.tokens[0] for s in _run(model, tok, "ROMEO:", temp=0, cache=cache, **opts)]
    expected = _greedy_reference(model, tok, "ROMEO:", cache=cache, **opts)
    uncached = _greedy_reference(model, tok, "ROMEO:", **opts)
    assert len(got) == len(expected) == 12
    assert all((a == b).all() for a, b in zip(got, expected))
    assert any((a != b).any() for a, b in zip(expected, uncached))


def test_uncached_blocks_and_remasking_match_the_reference(tiny):
    """Remasking hides exactly floor(R x n) of the block's earlier commits, the lowest-confidence ones."""
    model, tok = tiny
    for opts in (dict(max_tokens=24, steps=12, block_length=12), dict(max_tokens=20, steps=10, remask=0.3),
                 dict(max_tokens=24, steps=12, block_length=12, remask=0.5)):
        states = _run(model, tok, "ROMEO:", temp=0, **opts)
        expected = _greedy_reference(model, tok, "ROMEO:", **opts)
        assert [s.tokens[0].tolist() for s in states] == [e.tolist() for e in expected], opts
        if opts.get("remask"):
            assert sum(int(s.remasked.sum()) for s in states) >= len(states) - 2  # revision happened
