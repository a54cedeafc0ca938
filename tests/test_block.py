"""Block diffusion: the [noisy; clean] layout and its mask, the block NELBO, adaptation from an AR model
(--init-from), and decoding with an exact KV cache against recomputing everything."""

import importlib
import json

import mlx_dlm  # noqa: F401  (OpenBLAS under MLX)
import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY_TRAIN, cli_error, metrics_rows, untrained, user_error

from mlx.utils import tree_flatten

from mlx_dlm import train
from mlx_dlm.block_decode import decode_blocks
from mlx_dlm.decoding import build_canvas
from mlx_dlm.diffusion import ar_loss, block_attention_mask, block_logits, block_loss
from mlx_dlm.errors import UserError
from mlx_dlm.eval import block_nelbo
from mlx_dlm.io import load
from mlx_dlm.model import Model, ModelArgs, decode_layout
from mlx_dlm.options import SamplerOptions, model_defaults
from mlx_dlm.sample import generate

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"


def _as_block(model, block_size: int, shift: bool) -> Model:
    """A block model with model's weights."""
    config = model.args.to_dict() | {"model_type": "block", "block_size": block_size, "logit_shift": shift}
    block = Model(ModelArgs(**config))
    block.update(model.parameters())
    return block


def _block_model(block_size=4, shift=True, pos_emb="rope", seed=4):
    ar, tok = untrained(TEXT, 64, model_type="ar", seed=seed)
    if pos_emb == "learned":
        return _as_block(ar, block_size, shift), tok
    config = ar.args.to_dict() | {"pos_emb": "rope"}
    rope = Model(ModelArgs(**config))
    rope.update({k: v for k, v in ar.parameters().items() if k != "pos_emb"})
    return _as_block(rope, block_size, shift), tok


def test_block_mask_follows_its_definition():
    L, B = 10, 3  # a last block shorter than B
    block = np.arange(L) // B
    want = np.zeros((2 * L, 2 * L), dtype=bool)
    for i in range(L):
        for j in range(L):
            want[i, j] = block[i] == block[j]  # noisy sees its own noisy block
            want[i, L + j] = block[j] < block[i]  # and earlier clean blocks
            want[L + i, L + j] = block[j] <= block[i]  # clean sees clean up to its own block
    np.testing.assert_array_equal(np.array(block_attention_mask(L, B)), want)


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
@pytest.mark.parametrize("shift", [False, True])
def test_one_forward_over_noisy_and_clean_equals_a_forward_per_block(pos_emb, shift):
    """The 2L layout (both copies at the same positions, one mask) gives each noisy block the logits of a
    forward over just [clean blocks before it; the noisy block] under block-causal attention."""
    model, tok = _block_model(4, shift, pos_emb)
    B, L = 4, 18
    rng = np.random.default_rng(0)
    clean = mx.array(rng.integers(1, tok.vocab_size, (2, L)).astype(np.int32))
    noisy = mx.where(mx.array(rng.random((2, L)) < 0.5), tok.mask_id, clean)
    got = block_logits(model, noisy, clean)
    for b in range(-(-L // B)):
        end = min(L, (b + 1) * B)
        seq = mx.concatenate([clean[:, :b * B], noisy[:, b * B:end]], axis=1)
        blocks = mx.arange(end) // B
        want = model(seq, attn_mask=blocks[None, :] <= blocks[:, None])
        if shift:  # the first position of a block reads the clean output before it; the others their left neighbour
            prev = model(clean[:, :end], attn_mask=blocks[None, :] <= blocks[:, None])
            first = prev[:, b * B - 1:b * B] if b else prev[:, :1]  # position 0: given, never predicted
            want = mx.concatenate([first, want[:, b * B:end - 1]], axis=1)
        else:
            want = want[:, b * B:end]
        np.testing.assert_allclose(np.array(got[:, b * B:end]), np.array(want), atol=2e-5)


def test_shifted_blocks_of_one_are_the_ar_model_exactly():
    """With the shift and B = 1, every prediction is the AR model's next-token distribution, whatever is
    masked; so the block NELBO of AR weights is their exact NLL in expectation (each hidden token weighted by
    1/t, hidden with probability t). Checked to 5 standard errors of the mean of 200 draws (a false alarm
    rate below 1e-6 for a normal mean)."""
    ar, tok = untrained(TEXT, 64, model_type="ar")
    model = _as_block(ar, 1, True)
    tokens = mx.array(tok.encode_array(TEXT)[:2 * 32].reshape(2, 32))
    masked = mx.full(tokens.shape, tok.mask_id, dtype=tokens.dtype)
    np.testing.assert_allclose(np.array(block_logits(model, masked, tokens)[:, 1:]),
                               np.array(ar(tokens)[:, :-1]), atol=2e-5)
    nll = ar_loss(ar, tokens).item()
    draws = np.array([block_loss(model, tokens, tok.mask_id, key=mx.random.key(i)).item() for i in range(200)])
    assert abs(draws.mean() - nll) < 5 * draws.std() / np.sqrt(len(draws))


@pytest.mark.parametrize("t_per, t_range, complementary", [
    ("block", (0.0, 1.0), False), ("sequence", (0.0, 1.0), False), ("block", (0.3, 0.8), False),
    ("block", (0.0, 1.0), True)], ids=["per-block", "per-window", "clipped", "complementary"])
def test_block_loss_against_numpy(t_per, t_range, complementary):
    """The loss equals a numpy computation from the same draws: cross-entropy of the hidden positions, each
    weighted by 1/t of its block (or window), over the predicted positions, averaged over windows. Clipped: the
    ratios mapped into [lo, hi]. Complementary: the mean of that and the same with the mask flipped at 1 - t."""
    model, tok = _block_model(4, shift=False)
    tokens = mx.array(np.random.default_rng(1).integers(1, tok.vocab_size, (3, 16)).astype(np.int32))
    key = mx.random.key(7)
    got = block_loss(model, tokens, tok.mask_id, t_per=t_per, key=key, t_range=t_range,
                     complementary=complementary).item()
    from mlx_dlm.diffusion import block_t

    t_key, mask_key = mx.random.split(key)
    t = np.array(block_t(3, 16, 4, t_per, key=t_key))
    if t_per == "block":
        assert (t.reshape(3, 4, 4) == t.reshape(3, 4, 4)[:, :, :1]).all() and len(np.unique(t)) == 12
    else:
        assert (t == t[:, :1]).all()
    t = t_range[0] + (t_range[1] - t_range[0]) * t
    assert t_range[0] <= t.min() and t.max() <= t_range[1]
    hidden = np.array(mx.random.uniform(shape=(3, 16), key=mask_key)) < t

    def loss(hidden, t):
        noisy = np.where(hidden, tok.mask_id, np.array(tokens))
        logits = np.array(block_logits(model, mx.array(noisy), tokens), dtype=np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce = -np.take_along_axis(logp, np.array(tokens)[..., None], -1)[..., 0]
        return (np.where(hidden, ce / np.maximum(t, 1e-3), 0.0).sum(1) / 16).mean()

    want = (loss(hidden, t) + loss(~hidden, 1 - t)) / 2 if complementary else loss(hidden, t)
    assert got == pytest.approx(want, rel=1e-5)


def _decode(model, tok, prompt, options, exact, length=23):
    ids, editable = build_canvas(tok, prompt, length)
    x = None
    for x, *_ in decode_blocks(model, tok.mask_id, ids, editable, mx.random.key(3), options, None, (), exact):
        pass
    return np.array(x)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("prompt", ["F", "First Ci", "First Citizen:\n"])  # inside, at the end of, past a block
@pytest.mark.parametrize("options", [
    SamplerOptions(temp=0, steps=23), SamplerOptions(temp=1.0, steps=12, seed=1, num_samples=2),
    SamplerOptions(temp=0.8, threshold=0.3, strategy="margin", num_samples=2),
    SamplerOptions(temp=1.0, steps=23, remask=0.5, top_k=5)], ids=["greedy", "seeded", "threshold", "remask"])
def test_cached_decoding_equals_recomputing_everything(shift, prompt, options):
    """Token for token: the KV cache (prefill, the finished block folded into the next block's first pass, noisy
    passes over the cache) against a full forward over the canvas in the training layout for every pass."""
    model, tok = _block_model(4, shift)
    cached = _decode(model, tok, prompt, options, True)
    np.testing.assert_array_equal(cached, _decode(model, tok, prompt, options, False))
    assert (cached != tok.mask_id).all()


def test_block_generation_keeps_the_prompt_and_counts_its_passes():
    model, tok = _block_model(4)
    steps = list(mlx_dlm.stream_generate(model, tok, "First", max_tokens=11, steps=8, temp=0))
    # Positions 0-15 in blocks of 4: block 0 is prompt (prefilled); block 1 holds the prompt's "t" and 3 masks;
    # 8 steps over 3 blocks: 2 passes each. Rows run: block 1, 4 + 4; blocks 2 and 3 fold the finished block
    # into their first pass, 8 + 4 each.
    assert len(steps) == 6 and steps[-1].generated_tokens == 11
    assert tok.decode(steps[-1].tokens[0]).startswith("First")
    assert steps[-1].forward_tokens == 8 + 12 + 12
    # A threshold every proposal passes fills each block in one pass: 3 passes, none wasted on a full block.
    steps = list(mlx_dlm.stream_generate(model, tok, "First", max_tokens=11, threshold=1e-6, temp=1.0, seed=0))
    assert len(steps) == 3 and steps[-1].generated_tokens == 11


def test_block_models_refuse_what_they_cannot_do():
    model, tok = _block_model(4)
    assert "left to right" in user_error(generate, model, tok, "A", suffix="end")
    assert "--cfg-scale" in user_error(generate, model, tok, "A", cfg_scale=1.0)
    assert "blocks of 4" in user_error(generate, model, tok, "A", block_length=8)
    assert "context" in user_error(generate, model, tok, "A", max_tokens=64)
    assert "block_size" in user_error(ModelArgs, model_type="block")
    assert "block_size" in user_error(ModelArgs, model_type="dlm", block_size=4)


@pytest.fixture(scope="module")
def adapted_dir(tmp_path_factory, small_text_path, tiny_ar_dir):
    out = tmp_path_factory.mktemp("models") / "block"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "6", "--eval-every", "3",
                *TINY_TRAIN, "--objective", "block", "--block-size", "4", "--init-from", str(tiny_ar_dir)])
    return out


def test_init_from_an_ar_model_adapts_its_weights_and_records_the_block(adapted_dir, tiny_ar_dir):
    config = json.loads((adapted_dir / "config.json").read_text())
    assert config["model_type"] == "block" and config["block_size"] == 4 and config["logit_shift"] is True
    model, tok = load(adapted_dir)
    ar, _ = load(tiny_ar_dir)
    change = float(mx.abs(model.lm_head.weight - ar.lm_head.weight).max())
    assert 0 < change < 0.05  # trained from the AR weights: 6 steps move them, but not far
    text = generate(model, tok, "ROMEO:", max_tokens=9, steps=9, seed=0)
    assert text.startswith("ROMEO:") and len(text) == 15
    # it decodes as the shipped block models do: one position a pass, left to right (its next-token head)
    assert json.loads((adapted_dir / "sampling.json").read_text()) == {"block_steps": 4, "strategy": "left",
                                                                        "draft_length": 4}
    assert model_defaults(model) == SamplerOptions(block_steps=4, strategy="left", draft_length=4)


def test_init_from_may_keep_fewer_layers_for_a_shallow_drafter(tmp_path, capsys):
    """--arch n_layers below the source's keeps evenly spaced source layers (first and last), with the source's
    embeddings and head; more layers than the source has is refused in one line."""
    from mlx_dlm.io import save_model
    from mlx_dlm.model import init_model, preset_args
    from mlx_dlm.tokenizer import CharTokenizer

    assert train.kept_layers(6, 2) == [0, 5] and train.kept_layers(6, 3) == [0, 2, 5]
    assert train.kept_layers(6, 1) == [0] and train.kept_layers(6, 6) == list(range(6))
    tok = CharTokenizer.from_text("abcd efgh")
    source = init_model(preset_args("tiny", vocab_size=tok.vocab_size, n_layers=3, model_type="ar"), seed=1)
    save_model(tmp_path / "ar", source, tok)
    args = train.setup_arg_parser().parse_args(["--init-from", str(tmp_path / "ar"), "--objective", "block",
                                                "--block-size", "4", "--arch", "n_layers=2"])
    drafter, _ = train._adapted_model(args)
    assert drafter.args.n_layers == 2
    want = dict(tree_flatten(source.parameters()))
    for name, weight in tree_flatten(drafter.parameters()):
        layer = name.replace("layers.1.", "layers.2.")  # layers 0 and 2 of 3
        np.testing.assert_array_equal(np.array(weight), np.array(want[layer]))
    message = cli_error(capsys, train.main, ["--init-from", str(tmp_path / "ar"), "--objective", "block",
                                             "--arch", "n_layers=4", "--iters", "1", "--out", str(tmp_path / "x")])
    assert "has 3 layers: --arch n_layers may be 1 to 3, got 4" in message
    assert not (tmp_path / "x").exists()


def test_adapted_run_resumes_and_eval_reports_the_block_nelbo(adapted_dir, small_text_path):
    edited = '{"block_steps": 2}\n'  # the user's own choice: kept through the resumed run's checkpoints
    trained = (adapted_dir / "sampling.json").read_text()
    (adapted_dir / "sampling.json").write_text(edited)
    train.main(["--out", str(adapted_dir), "--resume", "--iters", "8", "--data", str(small_text_path)])
    assert (adapted_dir / "sampling.json").read_text() == edited
    (adapted_dir / "sampling.json").write_text(trained)  # as the trainer wrote it, for the tests after this one
    rows = [json.loads(line) for line in (adapted_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 8
    model, tok = load(adapted_dir)
    windows = tok.encode_array(TEXT * 4)[:4 * 32].reshape(4, 32)
    est = block_nelbo(model, windows, tok.mask_id, draws=3, batch_size=2)
    assert est.draws == 3 and 0.5 < est.mean < 6 and est.half_width > 0


def test_train_flags_for_blocks_are_checked(capsys, tiny_ar_dir, tmp_path):
    base = ["--out", str(tmp_path / "x"), "--iters", "1"]
    assert "--objective block" in cli_error(capsys, train.main, [*base, "--block-size", "4"])
    assert "--block-size" in cli_error(capsys, train.main, [*base, "--objective", "block", "--block-size", "0"])
    assert "masked-mean" in cli_error(capsys, train.main, [*base, "--objective", "block", "--loss", "masked-mean"])
    assert "architecture" in cli_error(capsys, train.main, [*base, "--objective", "block", "--init-from",
                                                            str(tiny_ar_dir), "--arch", "dim=32"])
    assert not (tmp_path / "x").exists()


def test_generate_command_on_a_block_model(adapted_dir, capsys):
    generate_command = importlib.import_module("mlx_dlm.generate")  # the package's `generate` is the function
    generate_command.main(["--model", str(adapted_dir), "--prompt", "AB", "--max-tokens", "10", "--threshold", "0.5",
                           "--verbose", "false", "--seed", "1"])
    out = capsys.readouterr().out
    assert out.startswith("AB") and len(out) == len("AB") + 10 + 1
    assert "left to right" in cli_error(capsys, generate_command.main, ["--model", str(adapted_dir), "--suffix", "x"])


def test_the_server_serves_a_block_model(adapted_dir):
    import http.client
    import threading

    from mlx_dlm.server import make_server

    server = make_server(str(adapted_dir), port=0, max_queue=2, max_body=4096, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def post(body):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        status, reply = post({"prompt": "AB", "max_tokens": 9, "temperature": 0, "seed": 0})
        assert status == 200 and len(reply["choices"][0]["text"]) == 9
        model, tok = load(adapted_dir)
        assert "AB" + reply["choices"][0]["text"] == generate(model, tok, "AB", max_tokens=9, temp=0)
        status, reply = post({"prompt": "AB", "suffix": "Z", "max_tokens": 9})
        assert status == 400 and "left to right" in reply["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["block", "dlm"])
def test_the_drafter_loss_against_numpy(kind):
    """--draft-for's loss: at each hidden position the cross-entropy against the AR teacher's next-token
    distribution given the true text (not the text's token), weighted by 1/t, over the window; position 0, which
    the teacher cannot predict, is never a target."""
    from mlx_dlm.diffusion import block_t, diffusion_loss, sample_t

    teacher, tok = untrained(TEXT, 64, model_type="ar", seed=8)
    if kind == "block":
        model, _ = _block_model(4, shift=True)
    else:
        model, _ = untrained(TEXT, 64, seed=9)
    tokens = mx.array(np.random.default_rng(2).integers(1, tok.vocab_size, (3, 16)).astype(np.int32))
    key = mx.random.key(11)
    if kind == "block":
        got = block_loss(model, tokens, tok.mask_id, key=key, teacher=teacher).item()
    else:
        got = diffusion_loss(model, tokens, tok.mask_id, key=key, teacher=teacher).item()
    t_key, mask_key = mx.random.split(key)
    if kind == "block":
        t = np.array(block_t(3, 16, 4, key=t_key))
        t[:, 0] = 0.0  # a shifted model's first token is given
    else:
        t = np.repeat(np.array(sample_t(3, key=t_key))[:, None], 16, axis=1)
    drawn = np.array(mx.random.uniform(shape=(3, 16), key=mask_key)) < t
    noisy = mx.array(np.where(drawn, tok.mask_id, np.array(tokens)))  # position 0 may be hidden, never scored
    hidden = drawn & (np.arange(16) > 0)
    logits = block_logits(model, noisy, tokens) if kind == "block" else model(noisy, mx.array(t[:, 0]))
    logits = np.array(logits, dtype=np.float64)
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    teach = np.array(teacher(tokens), dtype=np.float64)[:, :-1]
    p = np.exp(teach - teach.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ce = np.zeros((3, 16))
    ce[:, 1:] = -(p * logq[:, 1:]).sum(-1)
    want = (np.where(hidden, ce / np.maximum(t, 1e-3), 0.0).sum(1) / (16 - (kind == "block"))).mean()
    assert got == pytest.approx(want, rel=1e-4)


def test_draft_for_trains_a_drafter_of_the_ar_model(tmp_path, small_text_path, tiny_ar_dir, capsys):
    out = tmp_path / "drafter"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "3", "--eval-every", "3", *TINY_TRAIN,
                "--objective", "block", "--init-from", str(tiny_ar_dir), "--draft-for", str(tiny_ar_dir)])
    assert "a drafter for" in capsys.readouterr().out
    drafter, tok = load(out)
    ar, _ = load(tiny_ar_dir)
    assert generate(ar, tok, "AB", max_tokens=8, temp=0, draft_model=drafter) == generate(ar, tok, "AB", max_tokens=8,
                                                                                          temp=0)
    base = ["--data", str(small_text_path), "--out", str(tmp_path / "x"), "--iters", "1", *TINY_TRAIN]
    assert "--objective dlm or block" in cli_error(capsys, train.main, [*base, "--objective", "ar", "--draft-for",
                                                                        str(tiny_ar_dir)])
    assert "autoregressive" in cli_error(capsys, train.main, [*base, "--draft-for", str(out)])


def _feature_drafter(teacher, block_size=3, seed=9, layers=()):
    """An untrained feature drafter (blocks of block_size, reading teacher's states), with a random reading."""
    model, _ = untrained(TEXT, 64, seed=seed)
    config = model.args.to_dict() | {"model_type": "block", "block_size": block_size, "logit_shift": True,
                                     "feature_dim": teacher.args.dim * max(len(layers), 1), "feature_layers": layers}
    drafter = Model(ModelArgs(**config))
    drafter.update({k: v for k, v in model.parameters().items() if k != "t_proj"})
    return drafter


@pytest.mark.parametrize("layers, draft_context", [((), 0), ((0, 1), 0), ((), 1), ((0, 1), 2)])
def test_the_feature_drafter_loss_against_numpy(layers, draft_context):
    """A feature drafter's loss: for each window position j, one pass over [x_{j+1}, mask, mask] reading the
    teacher's hidden state at j (its last layer's output, or the outputs of the layers it names side by side); its
    row k predicts x_{j+2+k}, scored by cross-entropy against the teacher's prediction of that token from the true
    text before it (the teacher's output at j+1+k); the mean over every j whose whole block lies in the window and
    every row. A chained drafter adds to row k >= 1 its table's entry for the draft_context true tokens before
    x_{j+2+k} (teacher forcing), read as digits in base V, the latest last."""
    from mlx_dlm.diffusion import feature_draft_loss

    teacher, tok = untrained(TEXT, 64, model_type="ar", seed=8)
    drafter = _feature_drafter(teacher, layers=layers)
    V = tok.vocab_size
    if draft_context:
        chained = Model(ModelArgs(**(drafter.args.to_dict() | {"draft_context": draft_context})))
        chained.update(drafter.parameters())
        drafter = chained
        drafter.draft_table = mx.random.normal((2, V ** draft_context, V), key=mx.random.key(3))
    table = np.array(drafter.draft_table, dtype=np.float64) if draft_context else None
    tokens = np.random.default_rng(2).integers(1, tok.vocab_size, (2, 12)).astype(np.int32)
    got = feature_draft_loss(drafter, mx.array(tokens), tok.mask_id, teacher).item()
    x, outputs = teacher.tok_emb(mx.array(tokens)) + teacher.pos_emb[:12], []  # (its learned position table)
    for i, layer in enumerate(teacher.layers):  # the teacher's layers one by one, causal
        x = layer(x, None, i)
        outputs.append(x)
    state = mx.concatenate([outputs[i] for i in (layers or (1,))], axis=-1)
    teach = np.array(teacher.lm_head(x), dtype=np.float64)
    ces = []
    for b in range(2):
        for j in range(12 - 3):
            block = mx.array([[int(tokens[b, j + 1]), tok.mask_id, tok.mask_id]])
            q = np.array(drafter(block, features=state[b:b + 1, j]), dtype=np.float64)[0]
            for k in range(3):
                if draft_context and k:
                    before = tokens[b, j + 2 + k - draft_context:j + 2 + k]
                    q[k] += table[k - 1, sum(int(t) * V ** (len(before) - 1 - i) for i, t in enumerate(before))]
                logq = q[k] - np.log(np.exp(q[k]).sum())
                p = np.exp(teach[b, j + 1 + k] - teach[b, j + 1 + k].max())
                ces.append(-(p / p.sum() * logq).sum())
    assert got == pytest.approx(np.mean(ces), rel=1e-4)
    with pytest.raises(ValueError, match="verifier's features"):
        drafter(mx.array(tokens))


def test_a_chain_is_trained_alone_on_a_feature_drafter(tmp_path, small_text_path, tiny_ar_dir, capsys):
    """--draft-context 2 --train-only draft_table, started from a trained feature drafter: the chain's table learns
    (from zero) while every other weight stays the source drafter's, through a resume too; the chained drafter
    drafts for its AR model (greedy text unchanged). Misuse is one line each."""
    source, chained = tmp_path / "feature", tmp_path / "chained"
    feature = ["--data", str(small_text_path), *TINY_TRAIN, "--objective", "block", "--block-size", "3",
               "--draft-for", str(tiny_ar_dir), "--feature-drafter", "--eval-every", "2"]
    train.main([*feature, "--out", str(source), "--iters", "2", "--init-from", str(tiny_ar_dir), "--arch",
                "n_layers=1"])
    chain = [*feature, "--out", str(chained), "--init-from", str(source), "--draft-context", "2", "--train-only",
             "draft_table", "--learning-rate", "1e-2"]
    train.main([*chain, "--iters", "2"])
    train.main(["--resume", "--out", str(chained), "--iters", "4"])
    capsys.readouterr()
    (start, tok), (drafter, _) = load(source), load(chained)
    assert drafter.args.draft_context == 2 and drafter.args.feature_dim == start.args.feature_dim
    trained = dict(tree_flatten(drafter.parameters()))
    assert float(mx.abs(trained.pop("draft_table")).max()) > 0  # it learned
    for name, weight in tree_flatten(start.parameters()):
        np.testing.assert_array_equal(np.array(trained.pop(name)), np.array(weight), err_msg=name)
    assert not trained
    ar, _ = load(tiny_ar_dir)
    assert generate(ar, tok, "AB", max_tokens=9, temp=0, draft_model=drafter, draft_length=3) == \
        generate(ar, tok, "AB", max_tokens=9, temp=0)
    base = ["--data", str(small_text_path), "--out", str(tmp_path / "x"), "--iters", "1", *TINY_TRAIN]
    assert "--draft-context applies to --feature-drafter" in cli_error(capsys, train.main,
                                                                       [*base, "--draft-context", "1"])
    with pytest.raises(SystemExit) as usage:  # argparse's refusal, as for every flag with choices
        train.main([*base, "--draft-context", "3"])
    assert usage.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    assert "pass --feature-drafter --draft-context 2" in cli_error(capsys, train.main, [
        *feature, "--out", str(tmp_path / "y"), "--iters", "1", "--init-from", str(chained)])  # it would drop the table
    assert "with the same --feature-layers" in cli_error(capsys, train.main, [
        *feature, "--out", str(tmp_path / "z"), "--iters", "1", "--init-from", str(source), "--feature-layers", "0,1"])
    error = cli_error(capsys, train.main, [*base, "--train-only", "draft_table,lm_head"])
    assert "draft_table is not a parameter of this model" in error and "lm_head" in error.split("names:")[1]
    assert "draft_context must be 0, or 1 or 2 for a feature drafter" in user_error(
        ModelArgs, model_type="block", block_size=2, draft_context=1)


def test_feature_drafter_trains_and_drafts_for_its_ar_model(tmp_path, small_text_path, tiny_ar_dir, capsys):
    """--feature-drafter: a drafter reading the AR's states, validated by its distillation loss, that drafts for
    that AR model (greedy text unchanged) and refuses every use that would need it to write alone."""
    out = tmp_path / "feature"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "3", "--eval-every", "3", *TINY_TRAIN,
                "--objective", "block", "--block-size", "3", "--init-from", str(tiny_ar_dir), "--draft-for",
                str(tiny_ar_dir), "--feature-drafter", "--arch", "n_layers=1"])
    printed = capsys.readouterr().out
    assert "a feature drafter for" in printed and "distillation cross-entropy" in printed
    drafter, tok = load(out)
    ar, _ = load(tiny_ar_dir)
    assert drafter.args.feature_dim == ar.args.dim and drafter.args.n_layers == 1
    assert json.loads((out / "sampling.json").read_text()) == {"draft_length": 3}  # it only drafts: its block
    # FLOPs: forward + backward of one 3-row block for each of the 64 - 3 positions of 8 windows a step, and the
    # AR's forward over the windows
    per_step = 3 * drafter.flops_per_token(3) * 8 * 61 * 3 + ar.flops_per_token(64) * 8 * 64
    assert metrics_rows(out)[-1]["flops"] == pytest.approx(3 * per_step)
    assert generate(ar, tok, "AB", max_tokens=8, temp=0, draft_model=drafter, draft_length=3) == \
        generate(ar, tok, "AB", max_tokens=8, temp=0)
    assert "at most 3 tokens a round" in user_error(generate, ar, tok, "AB", draft_model=drafter, draft_length=4)
    assert "feature drafter" in user_error(generate, drafter, tok, "AB")
    assert "feature drafter" in user_error(mlx_dlm.eval.evaluate, str(out), str(small_text_path), judges=())
    from mlx_dlm.server import make_server

    assert "feature drafter" in user_error(make_server, str(out), port=0, quiet=True)
    wide = _feature_drafter(untrained(TEXT, 64, model_type="ar", seed=8)[0])
    wide = Model(ModelArgs(**(wide.args.to_dict() | {"feature_dim": ar.args.dim + 1})))
    assert "trained for another AR model" in user_error(generate, ar, tok, "AB", draft_model=wide)
    assert "feature_dim is 0" in user_error(ModelArgs, model_type="block", block_size=2, feature_layers=(1,))
    assert "positive for a block model" in user_error(ModelArgs, model_type="dlm", feature_dim=8)
    base = ["--data", str(small_text_path), "--out", str(tmp_path / "x"), "--iters", "1", *TINY_TRAIN]
    assert "--feature-drafter needs --draft-for" in cli_error(capsys, train.main, [*base, "--feature-drafter"])
    assert "applies to --feature-drafter" in cli_error(capsys, train.main, [*base, "--feature-layers", "0"])
    feature = [*base, "--objective", "block", "--init-from", str(tiny_ar_dir), "--draft-for", str(tiny_ar_dir),
               "--feature-drafter"]
    assert "distinct layers of" in cli_error(capsys, train.main, [*feature, "--feature-layers", "0,2"])
    assert "distinct layers of" in cli_error(capsys, train.main, [*feature, "--feature-layers", "1,1"])
    assert "comma-separated layer numbers" in cli_error(capsys, train.main, [*feature, "--feature-layers", "a"])
    train.main([*feature, "--feature-layers", "0,1", "--eval-every", "1"])
    two, _ = load(tmp_path / "x")
    assert two.args.feature_layers == (0, 1) and two.args.feature_dim == 2 * ar.args.dim
    assert generate(ar, tok, "AB", max_tokens=8, temp=0, draft_model=two) == generate(ar, tok, "AB", max_tokens=8,
                                                                                        temp=0)


@pytest.mark.parametrize("kind", ["block", "dlm"])
def test_left_strategy_commits_the_leftmost_masked_position_first(kind):
    """--strategy left: one position a pass, always the leftmost still masked (with a threshold, that one and any
    other proposal at least that confident)."""
    model, tok = _block_model(4) if kind == "block" else untrained(TEXT, 64, seed=3)
    prompt = "First"
    for state in mlx_dlm.stream_generate(model, tok, prompt, max_tokens=11, steps=11 if kind == "dlm" else 12,
                                         strategy="left", temp=1.0, seed=0):
        committed = np.flatnonzero(state.committed[0])
        assert len(committed) == 1 and committed[0] == len(prompt) + state.step - 1
    steps = list(mlx_dlm.stream_generate(model, tok, prompt, max_tokens=11, threshold=1.0, strategy="left",
                                         temp=1.0, seed=0))
    assert [int(np.flatnonzero(s.committed[0])[0]) for s in steps] == list(range(len(prompt), len(prompt) + 11))


def test_pass_cost_benchmark_times_every_pass_kind(adapted_dir, tiny_ar_dir, tmp_path):
    from benchmarks import pass_cost

    out = tmp_path / "passes.json"
    pass_cost.main(["--ar", str(tiny_ar_dir), "--block", str(adapted_dir), "--contexts", "8,16", "--trials", "3",
                    "--draft-length", "3", "--rows", "1,3,6", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["context"] for r in rows] == [8, 16] and all(r["draft_length"] == 3 for r in rows)
    for r in rows:
        assert min(r["ar_ms_per_token"], r["block_ms_per_pass"], r["folded_ms_per_pass"], r["verify_ms_per_pass"]) > 0
        assert r["verify_over_ar_step"] == pytest.approx(r["verify_ms_per_pass"] / r["ar_ms_per_token"])
        counts, ms = np.array([1, 3, 6.0]), np.array([r["rows_ms"][k] for k in ("1", "3", "6")])
        assert min(ms) > 0
        # the least-squares line: its residuals sum to zero and are orthogonal to the row counts
        residual = ms - (r["fixed_ms"] + r["ms_per_row"] * counts)
        assert abs(residual.sum()) < 1e-9 and abs((residual * counts).sum()) < 1e-9
    with pytest.raises(UserError, match="--rows needs at least two row counts"):
        pass_cost.main(["--ar", str(tiny_ar_dir), "--block", str(adapted_dir), "--rows", "4"])
    with pytest.raises(UserError, match="--draft-length must be at least 1"):
        pass_cost.main(["--ar", str(tiny_ar_dir), "--block", str(adapted_dir), "--draft-length", "0"])
    with pytest.raises(UserError, match="--ar takes an autoregressive model"):
        pass_cost.main(["--ar", str(adapted_dir), "--block", str(adapted_dir), "--contexts", "8"])


def test_layout_benchmark_times_both_layouts_of_every_setting(adapted_dir, tiny_ar_dir, tmp_path):
    from benchmarks import layout

    model, _ = mlx_dlm.load(tiny_ar_dir)
    weight = model.layers[0].mlp.fc1.weight
    values = np.array(weight)
    assert values.flags["F_CONTIGUOUS"] and not values.flags["C_CONTIGUOUS"]  # load's decode layout
    decode_layout(model, column_major=False)  # what the benchmark compares against
    assert np.array(model.layers[0].mlp.fc1.weight).flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(np.array(model.layers[0].mlp.fc1.weight), values)
    out = tmp_path / "layout.json"
    layout.main(["--ar", str(tiny_ar_dir), "--block", str(adapted_dir), "--max-tokens", "12", "--repeats", "1",
                 "--draft-length", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["ar", "block", "speculative"]
    for r in rows:
        assert min(r["decode_ms"], r["row-major_ms"]) > 0
        assert r["speedup"] == pytest.approx(r["row-major_ms"] / r["decode_ms"])
        assert r["decode_x_ar"] == pytest.approx(rows[0]["decode_ms"] / r["decode_ms"])
    assert rows[0]["decode_x_ar"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="--ar takes an autoregressive model"):
        layout.main(["--ar", str(adapted_dir), "--block", str(adapted_dir), "--repeats", "1"])
    with pytest.raises(UserError, match="at least 1"):
        layout.main(["--ar", str(tiny_ar_dir), "--block", str(adapted_dir), "--repeats", "0"])


def test_benchmark_takes_a_block_model(adapted_dir, tiny_model_dir, tiny_ar_dir, small_text_path, tmp_path):
    """Block rows per passes a block, threshold and commit order, at each batch size, judged like the others; the
    summary's block match and block frontier; a block drafter's speculative rows at every batch size."""
    bench = importlib.import_module("mlx_dlm.benchmark.__main__")
    out = tmp_path / "r.json"
    bench.main(["--dlm", str(tiny_model_dir), "--ar", str(tiny_ar_dir), "--block", str(adapted_dir),
                "--data", str(small_text_path), "--judge", "ngram", "--trials", "1", "--steps", "8",
                "--strategies", "confidence", "--batch-size", "1,2", "--max-tokens", "16", "--reference-windows", "8",
                "--block-steps", "1,4", "--block-thresholds", "0.5", "--block-strategies", "confidence,left",
                "--draft", str(adapted_dir), "--draft-lengths", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    block = {(r["batch_size"], r["variant"]): r for r in results["rows"] if r["model"] == "block"}
    variants = ["bd1", "bd4", "bd-thr0.5", "bd1-left", "bd4-left", "bd-thr0.5-left"]
    assert sorted(block) == sorted((b, v) for b in (1, 2) for v in variants)
    blocks = -(-(len("ROMEO:") + 16) // 4) - len("ROMEO:") // 4  # the prompt's unfinished block included
    for (b, v), r in block.items():
        assert r["strategy"] == ("left" if v.endswith("left") else "confidence") and r["block_size"] == 4
        if v.startswith("bd1"):  # one pass a block
            assert r["steps_per_block"] == 1 and r["nfe"] == blocks
        elif v.startswith("bd4"):  # at most one pass per open position: fewer in the partial first and last blocks
            assert blocks < r["nfe"] <= 4 * blocks and r["steps_per_block"] == r["nfe"] / blocks
        assert r["gen_ppl"]["ngram6"] > 1 and r["gen_ppl"] == block[(1, v)]["gen_ppl"]  # one setting, one quality
    assert results["args"]["block_strategies"] == ["confidence", "left"]
    throughput = importlib.import_module("mlx_dlm.benchmark.throughput")
    assert throughput.block_strategies(None, load(adapted_dir)) == ["left"]  # its sampling.json's order
    assert throughput.block_strategies(["margin"], load(adapted_dir)) == ["margin"]
    assert throughput.block_strategies(None, None) == ["confidence"]
    spec = [r for r in results["rows"] if r["model"] == "spec"]
    assert sorted(r["batch_size"] for r in spec) == [1, 2]
    assert all(r["drafter"] == str(adapted_dir) and r["drafter_type"] == "block" for r in spec)
    assert throughput._family(spec[0]) == "speculative: block model drafts K, AR verifies"  # the plot's legend names it
    for summary in results["equal_quality"]:
        assert "block_match" in summary["per_ar_setting"][0]
        assert all(f["block"] is not None for f in summary["frontier"].values())


def test_clipped_and_complementary_flags_are_checked(capsys, tmp_path):
    base = ["--out", str(tmp_path / "x"), "--iters", "1"]
    assert "apply to --objective block" in cli_error(capsys, train.main, [*base, "--complementary"])
    assert "0 <= LO < HI <= 1" in cli_error(capsys, train.main, [*base, "--objective", "block", "--t-range", "0.8",
                                                                 "0.3"])
    assert not (tmp_path / "x").exists()
