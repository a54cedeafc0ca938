"""ONNX export: onnxruntime on the CPU against MLX, within 1e-4, for simple_dlm's layout and modern ones."""

import importlib
import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import needs

onnx = needs("onnx", "onnx")
ort = needs("onnxruntime", "test")

import mlx_dlm  # noqa: E402
from mlx_dlm.model import init_model, preset_args  # noqa: E402
from mlx_dlm.tokenizer import CharTokenizer  # noqa: E402


export = importlib.import_module("mlx_dlm.export")
TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.!\n")


@pytest.mark.parametrize("layout", [
    dict(preset="simple_dlm", dim=32, n_layers=2, hidden_dim=64, max_seq_len=64),
    dict(preset="base", dim=32, n_layers=2, hidden_dim=64, n_heads=4),
    dict(preset="tiny", n_heads=4, n_kv_heads=2, mlp="gelu", norm="layernorm", bias=True),
    dict(preset="tiny", n_heads=4, n_kv_heads=1, qkv_bias=True, logit_shift=True, tie_embeddings=True),
    dict(preset="base", dim=32, n_layers=2, hidden_dim=64, n_heads=4, subs_mask_id=0, dropout=0.2, time_cond=True),
], ids=["simple_dlm", "base", "gqa-gelu-layernorm", "dream-like", "subs-dropout"])
def test_onnx_logits_match_mlx(tmp_path, layout):
    layout = dict(layout)
    model = init_model(preset_args(layout.pop("preset"), vocab_size=TOK.vocab_size, **layout), seed=2)
    model.eval()  # as loaded (dropout off)
    mlx_dlm.save_model(tmp_path / "m", model, TOK)
    export.main(["onnx", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "web")])
    session = ort.InferenceSession(str(tmp_path / "web" / "model.onnx"), providers=["CPUExecutionProvider"])
    for length, t in ((17, 0.3), (40, 0.9)):  # the sequence length is dynamic
        tokens = np.random.default_rng(length).integers(0, TOK.vocab_size, size=length)
        (got,) = session.run(["logits"], {"tokens": tokens.astype(np.int64), "mask_prob": np.array([t], np.float32)})
        want = np.array(model(mx.array(tokens[None].astype(np.int32)), mx.array([t])))[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    vocab = json.loads((tmp_path / "web" / "vocab.json").read_text())
    assert vocab[0] == "[MASK]" and "".join(vocab[1:]) == "".join(TOK.chars)


def test_export_refuses_what_it_cannot_write(tmp_path, tiny_ar_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        export.main(["onnx", "--model", str(tiny_ar_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and "autoregressive" in err
    block = init_model(preset_args("tiny", vocab_size=TOK.vocab_size, model_type="block", block_size=4), seed=0)
    mlx_dlm.save_model(tmp_path / "b", block, TOK)
    with pytest.raises(SystemExit) as exc:
        export.main(["onnx", "--model", str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and "block-diffusion" in err
    assert not (tmp_path / "o").exists()
    model = init_model(preset_args("tiny", vocab_size=TOK.vocab_size), seed=0)
    mlx_dlm.model.quantize(model, group_size=32, bits=4)
    mlx_dlm.save_model(tmp_path / "q", model, TOK, extra={"quantization": {"group_size": 32, "bits": 4}})
    with pytest.raises(SystemExit):
        export.main(["onnx", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "o")])
    assert "quantized weights is not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
