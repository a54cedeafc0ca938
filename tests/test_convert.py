"""Converter: exact logits parity with PyTorch models of the source layouts, safety, errors."""

import hashlib
import importlib
import json
import pickle
import warnings

import mlx.core as mx
import numpy as np
import pytest

from conftest import needs

torch = needs("torch", "convert")

import mlx_dlm  # noqa: E402
import mlx_dlm.model  # noqa: E402
from conftest import cli_error, user_error  # noqa: E402

from torch_models import NanoGPT, SimpleDLM  # noqa: E402

convert = importlib.import_module("mlx_dlm.convert.__main__")
generate_cli = importlib.import_module("mlx_dlm.generate")
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def _converted(tmp_path, argv):
    convert.main([*argv, "--out", str(tmp_path / "out")])
    return tmp_path / "out"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("fused", [True, False], ids=["fused-qkv", "separate-qkv"])
def test_simple_dlm_parity(tmp_path, text_file, fused):
    torch.manual_seed(0)
    vocab = len(set(TEXT)) + 1
    ref = SimpleDLM(vocab, fused=fused).eval()
    torch.save(ref.state_dict(), tmp_path / "checkpoint.pt")  # as simple_dlm's trainer saves it
    out = _converted(tmp_path, ["simple_dlm", str(tmp_path / "checkpoint.pt"), "--text", str(text_file)])
    model, tok = mlx_dlm.load(out)
    assert model.args.n_heads == 1 and model.args.max_seq_len == 64 and tok.vocab_size == vocab

    x = np.random.default_rng(0).integers(0, vocab, size=(3, 40))
    for t in ([0.05, 0.5, 0.95], [1.0, 0.3, 0.0]):
        with torch.no_grad():
            want = ref(torch.tensor(x), torch.tensor(t, dtype=torch.float32)).numpy()
        got = np.array(model(mx.array(x.astype(np.int32)), mx.array(t, dtype=mx.float32)))
        assert np.abs(got - want).max() <= 1e-4
    card = (out / "README.md").read_text()
    assert card.count("# out") == 1 and "--model out " in card
    sha = hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
    assert (f"Converted from a simple_dlm PyTorch checkpoint (`checkpoint.pt`, sha256 `{sha[:16]}…`) with "
            "`mlx_dlm.convert`.\nWeights: float32.\n") in card


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled_prefix", [False, True])
def test_nanogpt_parity(tmp_path, bias, compiled_prefix):
    torch.manual_seed(1)
    chars = sorted(set(TEXT))
    ref = NanoGPT(len(chars), bias=bias).eval()
    state = ref.state_dict()
    if compiled_prefix:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    margs = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, bias=bias, vocab_size=len(chars), dropout=0.0)
    torch.save({"model": state, "model_args": margs, "iter_num": 5, "best_val_loss": torch.tensor(1.5),
                "config": {"dataset": "shakespeare_char"}}, tmp_path / "ckpt.pt")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    out = _converted(tmp_path, ["nanogpt", str(tmp_path / "ckpt.pt"), "--meta", str(tmp_path / "meta.pkl")])
    model, tok = mlx_dlm.load(out)
    assert model.args.model_type == "ar" and model.args.tie_embeddings

    x = np.random.default_rng(1).integers(0, len(chars), size=(4, 30))
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    # Our ids are nanoGPT's + 1 (id 0 is [MASK]); compare every real token's logit.
    got = np.array(model(mx.array((x + 1).astype(np.int32))))[..., 1:]
    assert np.abs(got - want).max() <= 1e-4
    text = mlx_dlm.generate(model, tok, "Speak", max_tokens=20, seed=0)
    assert text.startswith("Speak") and len(text) == 25 and "[MASK]" not in text


@pytest.mark.parametrize("shuffled, tied, mask_buffers", [(True, True, False), (True, False, True), (False, False, False)],
                         ids=["shuffled-stoi", "shuffled-untied-old-buffers", "untied"])
def test_nanogpt_vocabulary_order_untied_head_and_old_buffers(tmp_path, shuffled, tied, mask_buffers):
    """nanoGPT ids follow meta.pkl's stoi, in any order; ours are sorted characters after [MASK]. Logits of the
    same text must agree character by character."""
    torch.manual_seed(2)
    chars = sorted(set(TEXT))
    if shuffled:
        chars = [chars[i] for i in np.random.default_rng(3).permutation(len(chars))]
    ref = NanoGPT(len(chars), bias=True).eval()
    if not tied:
        ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.lm_head.weight) * 0.1)
    state = ref.state_dict()
    margs = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, bias=True, vocab_size=len(chars), dropout=0.0)
    if mask_buffers:  # nanoGPT before flash attention saved its causal masks (and GPT-2 ports a masked_bias);
        for i in range(2):  # model_args before the `bias` option had neither it nor always vocab_size
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        del margs["bias"], margs["vocab_size"]
    torch.save({"model": state, "model_args": margs}, tmp_path / "ckpt.pt")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    out = _converted(tmp_path, ["nanogpt", str(tmp_path / "ckpt.pt"), "--meta", str(tmp_path / "meta.pkl")])
    model, tok = mlx_dlm.load(out)
    assert model.args.tie_embeddings == tied
    ours = np.array([tok.encode(c)[0] for c in chars])  # our id of nanoGPT's id i
    assert shuffled == (ours != np.arange(1, len(chars) + 1)).any()
    x = np.random.default_rng(4).integers(0, len(chars), size=(3, 40))
    with torch.no_grad():
        want = ref(torch.tensor(x)).numpy()
    got = np.array(model(mx.array(ours[x].astype(np.int32))))[..., ours]
    assert np.abs(got - want).max() <= 1e-4
    assert tok.decode(ours[x[0]].tolist()) == "".join(chars[i] for i in x[0])


def _nanogpt_files(tmp_path):
    torch.manual_seed(2)
    chars = sorted(set(TEXT))
    ref = NanoGPT(len(chars), d=64, bias=False)
    margs = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, bias=False, vocab_size=len(chars), dropout=0.0)
    torch.save({"model": ref.state_dict(), "model_args": margs}, tmp_path / "ckpt.pt")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return ["nanogpt", str(tmp_path / "ckpt.pt"), "--meta", str(tmp_path / "meta.pkl")]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_samples(tmp_path, capsys, bits):
    argv = _nanogpt_files(tmp_path)
    convert.main([*argv, "--out", str(tmp_path / "fp32")])
    convert.main([*argv, "--out", str(tmp_path / "q"), "-q", "--q-bits", str(bits), "--q-group-size", "32"])
    printed = capsys.readouterr().out.splitlines()
    n_params = sum(v.size for v in mx.load(str(tmp_path / "fp32" / "model.safetensors")).values())
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert printed[-2:] == [
        f"Converted nanogpt checkpoint {argv[1]} ({n_params / 1e6:.2f}M parameters, ar) -> {tmp_path / 'q'}",
        f"model.safetensors: {size / 1e6:.2f} MB (float32 weights would be {4 * n_params / 1e6:.2f} MB)"]
    card = (tmp_path / "q" / "README.md").read_text()
    assert f"\nWeights: float32, quantized to {bits} bits (group size 32).\n" in card
    full, tok = mlx_dlm.load(tmp_path / "fp32")
    quant, _ = mlx_dlm.load(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": bits}
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.5 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    x = mx.array(np.random.default_rng(3).integers(1, tok.vocab_size, size=(2, 20)).astype(np.int32))
    # Reference: the float model rebuilt from mx.dequantize of the stored weights computes what the quantized does.
    from mlx.utils import tree_flatten

    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    floats, n_quantized = {}, 0
    for name, value in stored.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{prefix}.scales" in stored:
            w = mx.dequantize(value, stored[f"{prefix}.scales"], stored[f"{prefix}.biases"], group_size=32, bits=bits)
            original = dict(tree_flatten(full.parameters()))[name]
            # Affine quantization: each stored weight within one level (its group's scale) of the float weight.
            step = mx.abs(mx.repeat(stored[f"{prefix}.scales"], 32, axis=-1)) + 1e-6
            assert bool(mx.all(mx.abs(w - original) <= step)), name
            floats[name], n_quantized = w, n_quantized + 1
        else:
            floats[name] = value
    assert n_quantized == 1 + 4 * 2  # the embedding and the four Linear layers of each of 2 blocks
    rebuilt = mlx_dlm.model.Model(full.args)
    rebuilt.load_weights(list(floats.items()), strict=True)
    a, b = np.array(rebuilt(x)), np.array(quant(x))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert not np.array_equal(np.array(full(x)), b)
    generate_cli.main(["--model", str(tmp_path / "q"), "--prompt", "All", "--max-tokens", "16", "--seed", "0"])
    out = capsys.readouterr().out
    assert out.startswith("All") and "Generation: 16 tokens" in out


def test_generate_cli_on_converted_simple_dlm(tmp_path, text_file, capsys):
    torch.manual_seed(0)
    torch.save(SimpleDLM(len(set(TEXT)) + 1).state_dict(), tmp_path / "c.pt")
    out = _converted(tmp_path, ["simple_dlm", str(tmp_path / "c.pt"), "--text", str(text_file), "--dtype", "bfloat16"])
    assert "Converted simple_dlm checkpoint" in capsys.readouterr().out
    generate_cli.main(["--model", str(out), "--prompt", "All:", "--max-tokens", "24", "--steps", "6", "--seed", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("All:") and "Generation: 24 tokens" in printed and "6 steps" in printed


class _Payload:
    """Unpickling this runs os.system: the attack a checkpoint or meta.pkl can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _error(capsys, argv) -> str:
    """The one-line message of a refused conversion (exit code 1), without its "error: " prefix."""
    return cli_error(capsys, convert.main, argv)


def _one_line_error(capsys, argv, match):
    assert match in _error(capsys, argv)


def test_malicious_checkpoint_does_not_run(tmp_path, text_file, capsys):
    marker = tmp_path / "pwned"
    torch.save({"token_emb": torch.zeros(3, 4), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    assert _error(capsys, ["simple_dlm", str(tmp_path / "evil.pt"), "--text", str(text_file),
                           "--out", str(tmp_path / "o")]) == (
        f"{tmp_path / 'evil.pt'} was refused by the safe loader: it holds more than tensors and plain data "
        "(is it a checkpoint? a meta.pkl goes to --meta)")
    argv = _nanogpt_files(tmp_path)[:2] + ["--meta", str(tmp_path / "evil.pkl"), "--out", str(tmp_path / "o")]
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"stoi": {"a": 0}, "evil": _Payload(marker)}, f)
    import os

    assert _error(capsys, argv) == (f"{tmp_path / 'evil.pkl'} is not plain data "
                                    f"(refused to load {os.system.__module__}.system); refusing to unpickle it")
    assert not marker.exists() and not (tmp_path / "o").exists()
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)  # the plain unpickler would have run it: the payload is real
    assert marker.exists()


def test_checkpoint_readers_say_what_is_wrong(tmp_path, monkeypatch):
    import sys

    from mlx_dlm.convert.torch_files import first_line, load_plain_pickle, load_torch, to_numpy
    from mlx_dlm.errors import TORCH_CPU_HINT

    assert first_line(ValueError("first\nsecond")) == "first" and first_line(EOFError()) == "EOFError"
    assert first_line(ValueError("x" * 300)) == "x" * 200

    missing = tmp_path / "none.pt"
    assert user_error(load_plain_pickle, missing) == f"{missing} does not exist"
    assert user_error(load_torch, missing) == f"checkpoint {missing} does not exist"
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    assert user_error(load_plain_pickle, empty) == f"{empty} is not a readable pickle (Ran out of input)"
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], a_list)
    assert user_error(load_torch, a_list) == f"{a_list} holds a list, not a state dict or checkpoint dict"
    torch.save({"w": torch.zeros(2)}, tmp_path / "whole.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    with pytest.raises(Exception) as torch_error:  # what torch itself says about that file
        torch.load(truncated, weights_only=True)
    assert user_error(load_torch, truncated) == (
        f"{truncated} is not a readable PyTorch checkpoint "
        f"({first_line(torch_error.value)})")
    # bfloat16 checkpoints (numpy has no bfloat16) become float32; non-tensors are dropped
    arrays = to_numpy({"w": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "step": 3})
    assert list(arrays) == ["w"] and arrays["w"].dtype == np.float32 and arrays["w"].tolist() == [1.5, -2.0]
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    assert user_error(load_torch, a_list) == (
        "converting PyTorch checkpoints needs torch, the CPU build is enough: "
        f"{TORCH_CPU_HINT}")


def test_meta_tables_are_checked_one_by_one():
    from mlx_dlm.convert.nanogpt import tokenizer_from_meta

    no_table = "meta.pkl has no `stoi` character table (only character-level nanoGPT models convert)"
    bad_entry = "meta.pkl `stoi` must map single characters to integer ids"
    for meta, message in [(["a", "b"], no_table), ({"itos": {0: "a"}}, no_table), ({"stoi": ["a"]}, no_table),
                          ({"stoi": {"a": 0, "bc": 1}}, bad_entry), ({"stoi": {"a": 0, "b": "1"}}, bad_entry),
                          ({"stoi": {"a": 0, 7: 1}}, bad_entry)]:
        assert user_error(tokenizer_from_meta, meta) == message, meta
    tokenizer, stoi = tokenizer_from_meta({"stoi": {"b": 0, "a": 1}})
    assert stoi == {"b": 0, "a": 1} and tokenizer.encode("ab") == [1, 2]  # ours: [MASK] = 0, sorted characters


@pytest.mark.parametrize("kind, prefix", [("llada", "model.transformer.blocks.3."),
                                          ("dream", "model.layers.3.self_attn.")])
def test_hf_keys_map_skip_rotary_buffers_and_refuse_strangers(kind, prefix):
    from mlx_dlm.convert.hf import our_key

    assert our_key(kind, prefix + "q_proj.weight") == "layers.3.q.weight"
    for buffer in ("inv_freq", "cos_cached", "sin_cached"):
        assert our_key(kind, f"{prefix}rotary_emb.{buffer}") is None
    for key in (prefix + "q_norm.weight", "model.vision_tower.weight"):
        assert user_error(our_key, kind, key) == f"unexpected key {key} for a {kind} checkpoint"


def test_layout_errors_list_at_most_six_keys_of_each_kind():
    from mlx_dlm.convert.torch_files import check_keys

    def message(found, expected):
        return user_error(check_keys, "demo", set(found), set(expected))

    six, seven = [f"k{i}" for i in range(6)], [f"k{i}" for i in range(7)]
    assert message(["x"], []) == "not a demo checkpoint layout: unexpected keys: x; missing keys: none"
    assert message([], ["y", "x"]) == "not a demo checkpoint layout: unexpected keys: none; missing keys: x, y"
    assert message(six, []) == "not a demo checkpoint layout: unexpected keys: k0, k1, k2, k3, k4, k5; missing keys: none"
    assert message(seven, ["z"]) == ("not a demo checkpoint layout: unexpected keys: k0, k1, k2, k3, k4, k5 (+1 more); "
                                     "missing keys: z")
    check_keys("demo", {"a", "b"}, {"b", "a"})  # the same keys: no complaint


def test_conversion_errors(tmp_path, text_file, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "c.pt"
    torch.save(SimpleDLM(len(set(TEXT)) + 1).state_dict(), ckpt)
    out = ["--out", str(tmp_path / "o")]
    assert _error(capsys, ["simple_dlm", str(ckpt), *out]) == ("simple_dlm checkpoints hold no vocabulary: pass --text "
                                                               "TRAIN.txt (the training text)")
    assert _error(capsys, ["nanogpt", str(ckpt), *out]) == ("nanoGPT checkpoints hold no vocabulary: pass --meta "
                                                            "META.pkl from the dataset folder")
    _one_line_error(capsys, ["simple_dlm", str(tmp_path / "none.pt"), "--text", str(text_file), *out], "does not exist")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:500])
    _one_line_error(capsys, ["simple_dlm", str(truncated), "--text", str(text_file), *out],
                    "not a readable PyTorch checkpoint")
    other = tmp_path / "other.txt"
    other.write_text("abc")
    vocab = len(set(TEXT)) + 1
    assert _error(capsys, ["simple_dlm", str(ckpt), "--text", str(other), *out]) == (
        f"the checkpoint has {vocab} tokens but --text gives 4 (3 characters + [MASK]): pass the text it was trained on")
    state = torch.load(ckpt)
    state["layers.0.9.weight"] = state.pop("layers.0.5.weight")
    torch.save(state, tmp_path / "odd.pt")
    assert _error(capsys, ["simple_dlm", str(tmp_path / "odd.pt"), "--text", str(text_file), *out]) == (
        "not a simple_dlm checkpoint layout: unexpected keys: layers.0.9.weight; missing keys: layers.0.5.weight")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foreign.pt")  # no simple_dlm key at all
    assert _error(capsys, ["simple_dlm", str(tmp_path / "foreign.pt"), "--text", str(text_file), *out]) == (
        "not a simple_dlm checkpoint layout: unexpected keys: foo; missing keys: mask_prob_emb.bias, "
        "mask_prob_emb.weight, output.bias, output.weight, pos_emb, token_emb")
    top = {k: v for k, v in state.items() if not k.startswith("layers.")}
    torch.save(top, tmp_path / "no_layers.pt")
    assert _error(capsys, ["simple_dlm", str(tmp_path / "no_layers.pt"), "--text", str(text_file), *out]) == (
        "this simple_dlm checkpoint has no layers (no layers.N.* keys)")
    _one_line_error(capsys, [*_nanogpt_files(tmp_path)[:3], str(text_file), *out], "not a readable pickle")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    _one_line_error(capsys, ["simple_dlm", str(ckpt), "--text", str(text_file), "--out", str(existing)],
                    "pass --force")
    assert (existing / "keep.txt").read_text() == "mine"
    # --force replaces a model directory only: a folder of something else is refused, untouched.
    assert _error(capsys, ["simple_dlm", str(ckpt), "--text", str(text_file), "--out", str(existing), "--force"]) == (
        f"--force replaces only a model directory, and {existing} holds no config.json: choose another --out")
    assert (existing / "keep.txt").read_text() == "mine"
    (existing / "config.json").write_text("{}")  # an (old) model directory
    convert.main(["simple_dlm", str(ckpt), "--text", str(text_file), "--out", str(existing), "--force"])
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_wrong_meta_is_refused(tmp_path, capsys):
    argv = _nanogpt_files(tmp_path)
    chars = sorted(set(TEXT))
    with open(tmp_path / "short.pkl", "wb") as f:  # a meta with fewer characters than the checkpoint's vocabulary
        pickle.dump({"stoi": {c: i for i, c in enumerate(chars[:-3])}}, f)
    _one_line_error(capsys, [*argv[:3], str(tmp_path / "short.pkl"), "--out", str(tmp_path / "o")],
                    "only character-level nanoGPT checkpoints convert")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    ckpt["model_args"]["vocab_size"] = 50304  # a GPT-2 BPE model given a character meta
    torch.save(ckpt, tmp_path / "bpe.pt")
    _one_line_error(capsys, [argv[0], str(tmp_path / "bpe.pt"), *argv[2:], "--out", str(tmp_path / "o")],
                    "the checkpoint's vocabulary has 50304 tokens but meta.pkl has")
    assert not (tmp_path / "o").exists()


def test_nanogpt_layout_errors_name_the_problem(tmp_path, capsys):
    argv = _nanogpt_files(tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    out = ["--out", str(tmp_path / "o")]

    def refused(obj, name="bad.pt", meta=argv[3]):
        torch.save(obj, tmp_path / name)
        return _error(capsys, ["nanogpt", str(tmp_path / name), "--meta", meta, *out])

    for obj in (ckpt["model"], {"model": ckpt["model"]}, {"model_args": ckpt["model_args"]}):
        assert refused(obj) == "not a nanoGPT checkpoint: expected a dict with `model` and `model_args`"
    no_heads = {k: v for k, v in ckpt["model_args"].items() if k != "n_head"}
    assert refused({**ckpt, "model_args": no_heads}) == "nanoGPT model_args is incomplete ('n_head')"
    odd = dict(ckpt["model"])
    odd["transformer.h.0.mlp.c_gate.weight"] = odd.pop("transformer.h.0.mlp.c_fc.weight")
    assert refused({**ckpt, "model": odd}) == ("not a nanoGPT checkpoint layout: unexpected keys: "
                                               "transformer.h.0.mlp.c_gate.weight; missing keys: "
                                               "transformer.h.0.mlp.c_fc.weight")
    chars = sorted(set(TEXT))
    vocab_error = (f"the checkpoint's vocabulary has {len(chars)} tokens but meta.pkl has {len(chars)} characters: "
                   "only character-level nanoGPT checkpoints convert, with the meta.pkl of their own dataset")
    with open(tmp_path / "gap.pkl", "wb") as f:  # as many characters, but the ids skip one (last id = V)
        pickle.dump({"stoi": {c: i + (i == len(chars) - 1) for i, c in enumerate(chars)}}, f)
    assert refused(ckpt, meta=str(tmp_path / "gap.pkl")) == vocab_error
    wider = dict(ckpt["model"])  # model_args says V tokens, the embedding table has V + 1 rows
    wider["transformer.wte.weight"] = torch.cat([wider["transformer.wte.weight"], wider["transformer.wte.weight"][:1]])
    assert refused({**ckpt, "model": wider}) == vocab_error
    assert not (tmp_path / "o").exists()


def test_meta_given_as_checkpoint_gets_no_unsafe_advice(tmp_path, capsys):
    argv = _nanogpt_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about the foreign pickle: it must not reach the user
        with pytest.raises(SystemExit):
            convert.main([argv[0], str(tmp_path / "meta.pkl"), *argv[2:], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1


def test_out_paths_that_cannot_be_directories(tmp_path, text_file, capsys):
    torch.save(SimpleDLM(len(set(TEXT)) + 1).state_dict(), tmp_path / "c.pt")
    argv = ["simple_dlm", str(tmp_path / "c.pt"), "--text", str(text_file)]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert _error(capsys, [*argv, "--out", str(a_file), "--force"]) == (
        f"--out {a_file} is a file, not a model directory: choose another --out")
    assert _error(capsys, [*argv, "--out", str(a_file / "model")]) == f"--out's parent {a_file} is a file, not a folder"
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "notes.txt", "train.txt"]  # nothing left behind


def test_a_failed_conversion_leaves_nothing_and_a_good_one_is_readable(tmp_path, text_file, monkeypatch):
    """The model is built in a hidden temp folder beside --out and swapped in; a failure removes it and leaves an
    existing --out alone. The result gets the usual folder permissions (mkdtemp makes 0o700)."""
    import stat

    torch.manual_seed(0)
    state = SimpleDLM(len(set(TEXT)) + 1).state_dict()
    torch.save({"model": state, "step": 7}, tmp_path / "wrapped.pt")  # a training checkpoint dict, not bare weights
    argv = ["simple_dlm", str(tmp_path / "wrapped.pt"), "--text", str(text_file), "--out", str(tmp_path / "out")]
    convert.main(argv)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    (tmp_path / "out" / "mine.txt").write_text("keep")
    seen = []

    def failing_save(directory, *args, **kwargs):
        seen.append(directory)
        (directory / "partial.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert.main([*argv, "--force"])
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".out.") and not seen[0].exists()
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train.txt", "wrapped.pt"]


def test_upload_repo_uploads_the_converted_directory(tmp_path, text_file, monkeypatch, capsys):
    import mlx_dlm.upload

    calls = []
    monkeypatch.setattr(mlx_dlm.upload, "upload",
                        lambda directory, repo: calls.append((directory, repo)) or f"https://hf.co/{repo}")
    torch.save(SimpleDLM(len(set(TEXT)) + 1).state_dict(), tmp_path / "c.pt")
    convert.main(["simple_dlm", str(tmp_path / "c.pt"), "--text", str(text_file), "--out", str(tmp_path / "out"),
                  "--upload-repo", "someone/tiny"])
    assert calls == [(tmp_path / "out", "someone/tiny")] and (tmp_path / "out" / "config.json").exists()
    assert capsys.readouterr().out.splitlines()[-1] == "Uploaded to https://hf.co/someone/tiny"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["source"] == "simple_dlm" and config["dtype"] == "float32"


def test_help_and_the_parser_refusals(capsys):
    with pytest.raises(SystemExit) as exc:
        convert.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exc.value.code == 0 and shown.startswith("usage: mlx_dlm.convert ")  # each help text: test_cli
    args = convert.setup_arg_parser().parse_args(["hf", "some/model", "--out", "o", "-q"])
    assert (args.q_bits, args.q_group_size, args.dtype, args.force) == (4, 64, None, False)  # as docs/models.md documents
    for bits, group, dtype in [(8, 32, "float16"), (4, 128, "bfloat16"), (8, 64, "float32")]:
        args = convert.setup_arg_parser().parse_args(["hf", "a/b", "--out", "o", "-q", "--q-bits", str(bits),
                                                      "--q-group-size", str(group), "--dtype", dtype])
        assert (args.q_bits, args.q_group_size, args.dtype) == (bits, group, dtype)
    for argv, complaint in [(["gguf", "c.pt", "--out", "o"], "argument source: invalid choice: 'gguf'"),
                            (["simple_dlm", "c.pt"], "the following arguments are required: --out"),
                            (["hf", "a/b", "--out", "o", "-q", "--q-bits", "3"], "argument --q-bits: invalid choice: 3"),
                            (["hf", "a/b", "--out", "o", "--q-group-size", "48"],
                             "argument --q-group-size: invalid choice: 48"),
                            (["hf", "a/b", "--out", "o", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'")]:
        with pytest.raises(SystemExit) as exc:
            convert.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and complaint in err and "mlx_dlm.convert: error: " in err, err
