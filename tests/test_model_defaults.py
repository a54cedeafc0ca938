"""A model directory's sampling.json: the model's own decoding defaults, where each caller meets them (the Python
API, `mlx_dlm.generate`, chat, the server, eval), how the caller's options override them, and its one-line errors.
Also `block_steps`, the pace a block model's defaults are written in."""

import argparse
import http.client
import importlib
import json
import shutil
import threading

import mlx_dlm  # noqa: F401  (OpenBLAS under MLX)
import numpy as np
import pytest
from conftest import cli_error, untrained, user_error

from mlx_dlm.io import load, save_model
from mlx_dlm.model import Model, ModelArgs
from mlx_dlm.options import SamplerOptions, model_defaults, over_defaults
from mlx_dlm.sample import generate, stream_generate

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
generate_command = importlib.import_module("mlx_dlm.generate")  # the package's `generate` is the function


def _block_dir(tmp_path, defaults: dict | None, block_size: int = 4):
    """An untrained block model (next-token head) saved as a model directory, with sampling.json = defaults."""
    ar, tok = untrained(TEXT, 64, model_type="ar")
    block = Model(ModelArgs(**ar.args.to_dict() | {"model_type": "block", "block_size": block_size,
                                                    "logit_shift": True}))
    block.update(ar.parameters())
    out = tmp_path / "block"
    save_model(out, block, tok)
    if defaults is not None:
        (out / "sampling.json").write_text(json.dumps(defaults))
    return out


def _tokens(model, tok, prompt, **options) -> np.ndarray:
    return list(stream_generate(model, tok, prompt, **options))[-1].tokens


def test_block_steps_is_steps_spread_over_the_blocks(tmp_path, tiny_model_dir):
    """block_steps k runs the same passes as steps = k x the blocks decoded (what steps meant before it)."""
    model, tok = load(_block_dir(tmp_path, None))
    # "First": block 0 is prompt; block 1 holds "t" and 3 masks; 11 tokens fill blocks 1-3
    for options in (dict(temp=0), dict(temp=1.0, seed=3), dict(temp=1.0, seed=3, strategy="left")):
        by_block = list(stream_generate(model, tok, "First", max_tokens=11, block_steps=2, **options))
        assert len(by_block) == 6
        np.testing.assert_array_equal(by_block[-1].tokens, _tokens(model, tok, "First", max_tokens=11, steps=6,
                                                                    **options))
    # more steps than a block has positions: one a pass (3 + 4 + 4)
    assert len(list(stream_generate(model, tok, "First", max_tokens=11, block_steps=9, temp=0))) == 11
    assert not (tiny_model_dir / "sampling.json").exists()  # the trainer writes one for block models only
    dlm, dtok = load(tiny_model_dir)  # semi-autoregressive blocks of a full-sequence model: the same meaning
    np.testing.assert_array_equal(_tokens(dlm, dtok, "RO", max_tokens=12, block_length=4, block_steps=3, seed=1),
                                  _tokens(dlm, dtok, "RO", max_tokens=12, block_length=4, steps=9, seed=1))


def test_sampling_json_sets_how_the_model_decodes(tmp_path):
    """Left order, one position a pass: every pass commits exactly the leftmost masked position."""
    model, tok = load(_block_dir(tmp_path, {"strategy": "left", "block_steps": 4}))
    assert model_defaults(model) == SamplerOptions(strategy="left", block_steps=4)
    states = list(stream_generate(model, tok, "First", max_tokens=11, seed=0))
    assert len(states) == 11
    for before, after in zip([None, *states], states):
        masked = np.flatnonzero(after.editable & ((before.tokens[0] if before else np.full(16, tok.mask_id))
                                                  == tok.mask_id))
        assert np.flatnonzero(after.committed[0]).tolist() == [masked[0]]
    # a SamplerOptions is used as given: no model defaults under it
    plain, _ = load(_block_dir(tmp_path / "plain", None))
    options = SamplerOptions(max_tokens=11, steps=6, seed=0)
    np.testing.assert_array_equal(_tokens(model, tok, "First", options=options),
                                  _tokens(plain, tok, "First", options=options))


def test_the_callers_options_override_and_the_pace_is_one_choice(tmp_path):
    defaults = SamplerOptions(strategy="left", threshold=0.5, block_steps=2, temp=0.7)
    assert over_defaults(defaults, {"temp": 0.0}) == defaults.replace(temp=0.0)
    assert over_defaults(defaults, {"steps": 3}) == SamplerOptions(strategy="left", steps=3, temp=0.7)
    assert over_defaults(defaults, {"block_steps": 1}) == SamplerOptions(strategy="left", block_steps=1, temp=0.7)
    model, tok = load(_block_dir(tmp_path, {"strategy": "left", "threshold": 0.5, "temp": 0.0}))
    states = list(stream_generate(model, tok, "First", max_tokens=11, steps=3))
    assert len(states) == 3  # the steps given, one a block; not the model's threshold
    np.testing.assert_array_equal(states[-1].tokens, _tokens(model, tok, "First", options=SamplerOptions(
        max_tokens=11, steps=3, strategy="left", temp=0.0)))


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    ("[1]", "does not hold a JSON object"),
    ('{"seed": 1}', "'seed' is not an option a model sets"),
    ('{"strategy": "best"}', "unknown strategy 'best'"),
    ('{"steps": "many"}', "--steps has the wrong type (str)"),
    ('{"block_steps": -1}', "--block-steps must be >= 0, got -1"),
])
def test_a_broken_sampling_json_is_a_one_line_error(tmp_path, capsys, tiny_model_dir, content, message):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "sampling.json").write_text(content)
    error = user_error(load, directory)
    assert str(directory / "sampling.json") in error and message in error
    assert message in cli_error(capsys, generate_command.main, ["--model", str(directory)])


def test_a_block_length_a_block_model_cannot_decode_is_refused_at_load(tmp_path):
    error = user_error(load, _block_dir(tmp_path, {"block_length": 8}))
    assert "sampling.json: block_length 8, but this block model decodes in its own blocks of 4" in error
    assert model_defaults(load(_block_dir(tmp_path / "same", {"block_length": 4}))[0]).block_length == 4


def test_generate_command_takes_the_models_defaults_under_its_flags(tmp_path, capsys, tiny_model_dir):
    directory = _block_dir(tmp_path, {"strategy": "left", "block_steps": 4, "temp": 0.0})
    model, tok = load(directory)

    def run(*flags):
        generate_command.main(["--model", str(directory), "--prompt", "First", "--max-tokens", "11",
                               "--verbose", "false", *flags])
        captured = capsys.readouterr()
        return captured.out.rstrip("\n"), captured.err

    assert run() == (generate(model, tok, "First", max_tokens=11), "")
    assert run()[0] == generate(model, tok, "First", SamplerOptions(max_tokens=11, strategy="left", block_steps=4,
                                                                     temp=0.0))
    assert run("--strategy", "confidence")[0] == generate(model, tok, "First", max_tokens=11, strategy="confidence")
    assert run("--steps", "3") == (generate(model, tok, "First", max_tokens=11, steps=3), "")  # the pace, no warning
    assert "--steps ignored: --block-steps decides" in run("--steps", "3", "--block-steps", "2")[1]
    generate_command.main(["--model", str(tiny_model_dir), "--max-tokens", "4", "--steps", "2", "--block-steps", "2",
                           "--verbose", "false"])
    assert "--block-steps has no effect without blocks" in capsys.readouterr().err


def test_a_drafter_brings_its_own_draft_length(tmp_path, capsys):
    """Speculative decoding drafts the drafter's sampling.json draft_length unless the caller gives one: in the
    Python API, the command and the server (whose /v1/models lists it)."""
    from mlx_dlm.server import make_server

    ar, tok = untrained(TEXT, 64, model_type="ar")
    save_model(tmp_path / "ar", ar, tok)
    drafter_dir = _block_dir(tmp_path, {"draft_length": 2})
    model, _ = load(tmp_path / "ar")
    drafter, _ = load(drafter_dir)

    def kept(**options):
        states = list(stream_generate(model, tok, "First", draft_model=drafter, max_tokens=20, seed=1, **options))
        return [k for s in states for k in s.draft_kept], states[-1].tokens

    own, tokens = kept()
    assert max(own) <= 2
    np.testing.assert_array_equal(tokens, kept(draft_length=2)[1])
    assert len(kept(draft_length=3)[0]) and kept(draft_length=3)[1].shape == tokens.shape
    flags = ["--model", str(tmp_path / "ar"), "--draft", str(drafter_dir), "--prompt", "First", "--max-tokens", "20",
             "--seed", "1"]
    generate_command.main(flags)
    assert "P(draft 1..2 kept)" in capsys.readouterr().out
    generate_command.main([*flags, "--draft-length", "3"])
    assert "P(draft 1..3 kept)" in capsys.readouterr().out
    server = make_server(str(tmp_path / "ar"), port=0, quiet=True, draft=str(drafter_dir))
    try:
        assert server.app.sampling()["draft_length"] == 2
        assert server.app.options({"prompt": "First"}).draft_length == 2
        assert server.app.options({"prompt": "First", "draft_length": 3}).draft_length == 3
    finally:
        server.server_close()


def test_chat_replies_with_the_models_defaults_and_its_own_length(tmp_path):
    from mlx_dlm.chat import chat_options, setup_arg_parser

    model, _ = load(_block_dir(tmp_path, {"strategy": "left", "block_steps": 4}))
    options = chat_options(model, setup_arg_parser().parse_args(["--model", "m", "--num-samples", "3"]), set())
    assert options == SamplerOptions(strategy="left", block_steps=4, max_tokens=256)
    args = argparse.Namespace(**vars(setup_arg_parser().parse_args(["--model", "m", "--strategy", "margin"])))
    assert chat_options(model, args, {"strategy"}).strategy == "margin"


def test_the_server_lists_and_applies_the_models_defaults(tmp_path):
    from mlx_dlm.server import make_server

    directory = _block_dir(tmp_path, {"strategy": "left", "block_steps": 4})
    server = make_server(str(directory), port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def request(method, path, body=None):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        conn.request(method, path, body=json.dumps(body) if body else None,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    try:
        status, models = request("GET", "/v1/models")
        sampling = models["data"][0]["sampling"]
        assert status == 200 and models["data"][0]["model_type"] == "block"
        assert sampling["strategy"] == "left" and sampling["block_steps"] == 4 and sampling["temperature"] == 1.0
        model, tok = load(directory)
        for extra, options in (({}, {}), ({"steps": 3}, {"steps": 3}), ({"strategy": "confidence"},
                                                                          {"strategy": "confidence"})):
            status, reply = request("POST", "/v1/completions", {"prompt": "First", "max_tokens": 11, "seed": 2,
                                                                **extra})
            assert status == 200
            assert "First" + reply["choices"][0]["text"] == generate(model, tok, "First", max_tokens=11, seed=2,
                                                                     **options)
    finally:
        server.shutdown()
        server.server_close()


def test_eval_samples_with_the_models_pace_unless_told(tmp_path, monkeypatch):
    from mlx_dlm import eval as eval_module

    calls, real = [], eval_module.stream_generate

    def record(model, tokenizer, prompt, options, draft_model=None):
        calls.append(options)
        yield from real(model, tokenizer, prompt, options, draft_model)

    monkeypatch.setattr(eval_module, "stream_generate", record)
    paced = _block_dir(tmp_path / "paced", {"strategy": "left", "block_steps": 4})
    unpaced = _block_dir(tmp_path / "unpaced", {"strategy": "left"})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40)
    common = dict(data_path=str(corpus), judges=["ngram"], seq_len=32, max_windows=2, samples=2, sample_tokens=7,
                  prompt="First", reference_windows=4)
    run = dict(max_tokens=7, seed=0, num_samples=2, strategy="left")
    for directory, steps, want, line in (
            (paced, None, SamplerOptions(block_steps=4, **run), "4 steps a block, strategy left"),
            (paced, 5, SamplerOptions(steps=5, **run), "5 steps, strategy left"),
            (unpaced, None, SamplerOptions(steps=eval_module.DEFAULT_SAMPLE_STEPS, **run), "64 steps, strategy left")):
        calls.clear()
        report = eval_module.evaluate(str(directory), sample_steps=steps, **common)
        assert calls == [want]
        assert SamplerOptions(**report.sample_options) == want.replace(seed=None, num_samples=1)
        assert f"Samples decoded with: {line}, temperature 1.0" in eval_module.format_report(report)
