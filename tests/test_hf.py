"""LLaDA and Dream from Hugging Face folders: logits parity with PyTorch models written here from the published
architectures, sharded reading, the Hub cache offline, chat templates, and one-line errors. Nothing is downloaded."""

import importlib
import json
import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import needs

torch = needs("torch", "convert")
tokenizers = needs("tokenizers", "hf")
jinja2 = needs("jinja2", "hf")

import mlx_dlm  # noqa: E402
from conftest import cli_error, user_error  # noqa: E402

convert = importlib.import_module("mlx_dlm.convert.__main__")
generate_cli = importlib.import_module("mlx_dlm.generate")

D, LAYERS, HEADS, KV_HEADS, FF, VOCAB = 64, 2, 4, 2, 96, 256
SPECIAL = ["<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|endoftext|>", "<|begin_of_text|>"]
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?'\n:"))
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


# --- PyTorch references, from the published architectures (not from mlx_dlm) --------------------------------

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    """Non-interleaved rotary embedding on (B, H, L, hd): rotate_half over the two halves."""
    hd, L = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(L, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _block(h, p, theta, eps):
    """One pre-norm block: bidirectional GQA attention with RoPE, then SwiGLU."""
    B, L, _ = h.shape
    hd = D // HEADS
    x = _rms(h, p["attn_norm"], eps)
    q = (x @ p["q"].T + p.get("bq", 0)).view(B, L, HEADS, hd).transpose(1, 2)
    k = (x @ p["k"].T + p.get("bk", 0)).view(B, L, KV_HEADS, hd).transpose(1, 2)
    v = (x @ p["v"].T + p.get("bv", 0)).view(B, L, KV_HEADS, hd).transpose(1, 2)
    q, k = _rope(q, theta), _rope(k, theta)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    h = h + att.transpose(1, 2).reshape(B, L, D) @ p["o"].T
    x = _rms(h, p["ff_norm"], eps)
    return h + (torch.nn.functional.silu(x @ p["gate"].T) * (x @ p["up"].T)) @ p["down"].T


def _reference_logits(params, tokens, theta, eps, shift):
    h = params["embed"][torch.as_tensor(tokens)]
    for p in params["layers"]:
        h = _block(h, p, theta, eps)
    logits = _rms(h, params["norm"], eps) @ params["head"].T
    if shift:  # Dream: the logits at i predict token i+1; position i's prediction comes from i-1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits.numpy()


# --- Hugging Face folders -----------------------------------------------------------------------------------

def _params(dream: bool):
    g = torch.Generator().manual_seed(3 if dream else 2)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.2  # noqa: E731
    kv = KV_HEADS * (D // HEADS)
    layers = []
    for _ in range(LAYERS):
        p = {"attn_norm": 1 + r(D), "q": r(D, D), "k": r(kv, D), "v": r(kv, D), "o": r(D, D), "ff_norm": 1 + r(D),
             "gate": r(FF, D), "up": r(FF, D), "down": r(D, FF)}
        if dream:
            p.update(bq=r(D), bk=r(kv), bv=r(kv))
        layers.append(p)
    return {"embed": r(VOCAB, D), "layers": layers, "norm": 1 + r(D), "head": r(VOCAB, D)}


def _hf_keys(params, dream: bool) -> dict[str, np.ndarray]:
    out = {}
    if dream:
        out["model.embed_tokens.weight"], out["model.norm.weight"] = params["embed"], params["norm"]
        out["lm_head.weight"] = params["head"]
        names = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                 "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        biases = {"bq": "self_attn.q_proj", "bk": "self_attn.k_proj", "bv": "self_attn.v_proj"}
        prefix = "model.layers"
    else:
        out["model.transformer.wte.weight"], out["model.transformer.ln_f.weight"] = params["embed"], params["norm"]
        out["model.transformer.ff_out.weight"] = params["head"]
        names = {"attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
                 "ff_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}
        biases = {}
        prefix = "model.transformer.blocks"
    for i, p in enumerate(params["layers"]):
        for ours, theirs in names.items():
            out[f"{prefix}.{i}.{theirs}.weight"] = p[ours]
        # Older checkpoints also saved the rotary frequencies, a buffer the converter skips.
        out[f"{prefix}.{i}.{'self_attn.' if dream else ''}rotary_emb.inv_freq"] = torch.arange(D // HEADS // 2) * 1.0
        for ours, theirs in biases.items():
            out[f"{prefix}.{i}.{theirs}.bias"] = p[ours]
    return {k: v.float().numpy() for k, v in out.items()}


def _write_tokenizer(folder, with_mask=True, template=TEMPLATE):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character, newlines too
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([s for s in SPECIAL if with_mask or s != "<|mdm_mask|>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def make_hf_folder(folder, dream: bool, shards: int = 2, with_mask: bool = True, template=TEMPLATE):
    """A tiny LLaDA- or Dream-format folder: config.json, sharded safetensors with an index, tokenizer files."""
    folder.mkdir(parents=True)
    params = _params(dream)
    tok = _write_tokenizer(folder, with_mask, template)
    mask_id = tok.token_to_id("<|mdm_mask|>")
    if dream:
        config = {"model_type": "Dream", "hidden_size": D, "intermediate_size": FF, "num_attention_heads": HEADS,
                  "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "vocab_size": VOCAB, "max_position_embeddings": 512,
                  "tie_word_embeddings": False, "mask_token_id": mask_id, "eos_token_id": tok.token_to_id("<|endoftext|>")}
    else:
        config = {"model_type": "llada", "d_model": D, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS,
                  "mlp_hidden_size": FF, "vocab_size": VOCAB, "embedding_size": VOCAB, "rope_theta": 500000.0,
                  "rms_norm_eps": 1e-5, "max_sequence_length": 512, "weight_tying": False, "include_bias": False,
                  "mask_token_id": mask_id, "eos_token_id": tok.token_to_id("<|endoftext|>")}
    (folder / "config.json").write_text(json.dumps(config))
    weights = _hf_keys(params, dream)
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]  # q, k and v of a layer land in different shards
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(str(folder / file), {k: mx.array(weights[k]) for k in part})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return params, config


@pytest.mark.parametrize("dream", [False, True], ids=["llada", "dream"])
def test_hf_conversion_logits_match_pytorch(tmp_path, dream):
    params, config = make_hf_folder(tmp_path / "hf", dream)
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--dtype", "float32"])
    model, tok = mlx_dlm.load(tmp_path / "out")
    assert model.args.n_kv_heads == KV_HEADS and model.args.logit_shift is dream and not model.args.time_cond
    assert tok.kind == "hf" and tok.mask_id == config["mask_token_id"] and tok.vocab_size < VOCAB == model.args.vocab_size
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11))
    got = np.array(model(mx.array(tokens, dtype=mx.int32)))
    want = _reference_logits(params, tokens, config.get("rope_theta"), config["rms_norm_eps"], dream)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    kind = "dream" if dream else "llada"
    assert (f"Converted from the {kind} Hugging Face model `{tmp_path / 'hf'}` with `mlx_dlm.convert hf`.\n"
            "Weights: float32.\n") in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("dream", [False, True], ids=["llada", "dream"])
def test_hf_conversion_from_the_hub_cache_offline(tmp_path, monkeypatch, dream):
    repo = "models--someone--tiny-" + ("dream" if dream else "llada")
    snapshot = tmp_path / "hub" / repo / "snapshots" / "0123abcd"
    params, config = make_hf_folder(snapshot, dream=dream)
    (tmp_path / "hub" / repo / "refs").mkdir()
    (tmp_path / "hub" / repo / "refs" / "main").write_text("0123abcd")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # HF_HUB_OFFLINE=1 is set for every test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once at import
    monkeypatch.chdir(tmp_path)
    convert.main(["hf", repo.replace("models--", "").replace("--", "/"), "--out", str(tmp_path / "out"),
                  "--dtype", "float32"])
    model, _ = mlx_dlm.load(tmp_path / "out")
    tokens = np.arange(9)[None]
    np.testing.assert_allclose(np.array(model(mx.array(tokens, dtype=mx.int32))),
                               _reference_logits(params, tokens, config["rope_theta"], config["rms_norm_eps"], dream),
                               atol=1e-4, rtol=1e-4)


def test_chat_template_renders_as_jinja2_does(tmp_path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    make_hf_folder(tmp_path / "hf", dream=False)
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    _, tok = mlx_dlm.load(tmp_path / "out")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    direct = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>")
    assert tok.apply_chat_template(messages) == direct
    ids = tok.encode(direct)
    assert ids[0] == tok.bos_id and tok.decode(ids) == direct  # special tokens in the text are single tokens
    assert tok.stop_ids and tok.encode("<|eot_id|>")[0] in tok.stop_ids


def test_quantized_tiny_model_samples(tmp_path):
    make_hf_folder(tmp_path / "hf", dream=True)
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "q4"), "-q", "--q-bits", "4",
                  "--q-group-size", "32"])
    model, tok = mlx_dlm.load(tmp_path / "q4")
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    text = mlx_dlm.generate(model, tok, "Hello", max_tokens=8, steps=4, seed=0)
    assert text.startswith("Hello") and len(tok.encode(text)) >= 9


def _one_line(capsys, argv, match):
    assert match in cli_error(capsys, convert.main, argv)


def test_hf_errors_are_one_line_and_leave_no_out(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    make_hf_folder(tmp_path / "bad_type", dream=False)
    config = json.loads((tmp_path / "bad_type" / "config.json").read_text())
    (tmp_path / "bad_type" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    _one_line(capsys, ["hf", str(tmp_path / "bad_type"), *out], "unsupported model_type 'llama' in config.json "
                                                                  "(supported: llada, dream)")
    make_hf_folder(tmp_path / "shard", dream=False)
    (tmp_path / "shard" / "model-00002-of-00002.safetensors").unlink()
    _one_line(capsys, ["hf", str(tmp_path / "shard"), *out], "missing shard model-00002-of-00002.safetensors")
    make_hf_folder(tmp_path / "nomask", dream=False, with_mask=False)
    config = json.loads((tmp_path / "nomask" / "config.json").read_text())
    del config["mask_token_id"]
    (tmp_path / "nomask" / "config.json").write_text(json.dumps(config))
    _one_line(capsys, ["hf", str(tmp_path / "nomask"), *out], "has no mask token")
    _one_line(capsys, ["hf", "someone/not-cached", *out], "cannot get someone/not-cached")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temp folders


def test_hf_weights_without_index_with_tied_head_and_broken_shards(tmp_path):
    from mlx_dlm.convert import hf

    folder = tmp_path / "hf"
    _, config = make_hf_folder(folder, dream=False)
    args = hf.model_args(config, "llada")
    indexed = hf.read_weights(folder, "llada", args, mx.float32)
    (folder / "model.safetensors.index.json").unlink()  # shards found by name alone, in order
    assert hf.shard_files(folder) == [folder / "model-00001-of-00002.safetensors",
                                      folder / "model-00002-of-00002.safetensors"]
    unindexed = hf.read_weights(folder, "llada", args, mx.float32)
    assert sorted(unindexed) == sorted(indexed) and all(mx.array_equal(unindexed[k], indexed[k]) for k in indexed)
    # A tied model keeps no head of its own, even when the checkpoint stores one.
    tied = hf.read_weights(folder, "llada", hf.model_args({**config, "weight_tying": True}, "llada"), mx.float32)
    assert sorted(tied) == sorted(k for k in indexed if k != "lm_head.weight")
    for gone in ("model.transformer.blocks.0.k_proj.weight", "model.transformer.blocks.0.v_proj.weight"):
        shard = next(f for f in hf.shard_files(folder) if gone in mx.load(str(f)))
        mx.save_safetensors(str(shard), {k: v for k, v in mx.load(str(shard)).items() if k != gone})
    assert user_error(hf.read_weights, folder, "llada", args, mx.float32) == (
        "layer 0 lacks its k, v projection weight: a shard is missing or the checkpoint is incomplete")
    first = folder / "model-00001-of-00002.safetensors"
    first.write_bytes(b"not safetensors")
    with pytest.raises(Exception) as mlx_error:
        mx.load(str(first))
    assert user_error(hf.read_weights, folder, "llada", args, mx.float32) == (
        f"{first} is not a readable safetensors file ({mlx_error.value})")
    index = folder / "model.safetensors.index.json"
    secret = tmp_path / "elsewhere.safetensors"  # a local file a hostile index points at
    mx.save_safetensors(str(secret), {"x": mx.zeros(2)})
    for name in (str(secret), "../elsewhere.safetensors", "sub/../../elsewhere.safetensors"):
        index.write_text(json.dumps({"weight_map": {"model.embed": name}}))
        assert user_error(hf.shard_files, folder) == (
            f"model.safetensors.index.json names a shard outside the model folder: {name!r}")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert user_error(hf.shard_files, folder) == (
        f"{folder / 'model.safetensors.index.json'} is not a valid "
        "safetensors index ('weight_map')")
    (folder / "model.safetensors.index.json").unlink()
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    assert user_error(hf.shard_files, folder) == f"{folder} holds no .safetensors weights"


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, capsys):
    make_hf_folder(tmp_path / "hf", dream=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "mlp_hidden_size": FF + 16}))
    with pytest.raises(SystemExit):
        convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: converted weights do not fit the model: ") and len(err.splitlines()) == 1
    assert f"({FF + 16}, {D})" in err and f"({FF}, {D})" in err and ".mlp." in err, err
    assert not (tmp_path / "out").exists()


def test_hf_source_and_config_errors_name_the_problem(tmp_path, monkeypatch):
    import fnmatch

    import huggingface_hub

    from mlx_dlm.convert import hf

    (tmp_path / "weights.pt").write_bytes(b"x")
    assert user_error(hf.resolve_source, str(tmp_path / "weights.pt")) == (
        f"{tmp_path / 'weights.pt'} is a file; give a Hugging Face model folder or a repo id (user/name)")
    for src in ("no-slash", "a/b/c", "./x", "/x", "~/x"):
        assert user_error(hf.resolve_source, src) == (
            f"{src} is not a folder, and does not look like a Hub repo id "
            "(user/name)")
    asked = {}

    def fake_download(repo_id, allow_patterns=None):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert hf.resolve_source("user/name") == tmp_path / "snapshot" and asked["repo_id"] == "user/name"
    # Only what a conversion reads is fetched: config, weights and index, tokenizer and template files.
    make_hf_folder(tmp_path / "model", dream=True)
    wanted = [p.name for p in (tmp_path / "model").iterdir()] + ["generation_config.json", "chat_template.jinja"]
    unwanted = ["pytorch_model.bin", "original/consolidated.00.pth", "README.md", "assets/figure.png"]
    fetched = lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in asked["allow_patterns"])  # noqa: E731
    assert all(map(fetched, wanted)) and not any(map(fetched, unwanted))

    def offline(repo_id, allow_patterns=None):
        raise OSError("no cached snapshot\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert user_error(hf.resolve_source, "user/name") == (
        "cannot get user/name from the Hugging Face Hub or its cache "
        "(no cached snapshot)")
    (tmp_path / "empty").mkdir()
    assert user_error(hf.read_config, tmp_path / "empty") == (
        f"{tmp_path / 'empty'} has no config.json: not a "
        "Hugging Face model folder")
    (tmp_path / "empty" / "config.json").write_text("{'model_type': 'llada'}")
    with pytest.raises(ValueError) as json_error:
        json.loads("{'model_type': 'llada'}")
    assert user_error(hf.read_config, tmp_path / "empty") == (
        f"{tmp_path / 'empty' / 'config.json'} is not valid JSON "
        f"({json_error.value})")
    assert user_error(hf.family, {}) == "unsupported model_type None in config.json (supported: llada, dream)"


@pytest.fixture
def tiny_instruct(tmp_path):
    make_hf_folder(tmp_path / "hf", dream=False)
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "instruct"), "--dtype", "float32"])
    return tmp_path / "instruct"


def test_generate_chat_applies_the_template_and_stops_at_eot(tiny_instruct, capsys):
    capsys.readouterr()
    generate_cli.main(["--model", str(tiny_instruct), "--chat", "Hi", "--system", "Be brief.", "--max-tokens", "64",
                       "--block-length", "32", "--cache", "dual", "--threshold", "0.9", "--seed", "0"])
    out = capsys.readouterr().out
    reply = out.split("\n==========\n")[0]
    assert "<|start_header_id|>" not in reply and "Be brief." not in reply  # the template is not echoed
    assert "<|eot_id|>" not in reply and "<|endoftext|>" not in reply  # cut at the stop token
    prompt_tokens = int(out.split("Prompt: ")[1].split(" tokens")[0])
    _, tok = mlx_dlm.load(tiny_instruct)
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt_tokens == len(tok.encode(rendered))  # the prompt is the rendered template


def test_special_tokens_a_user_types_are_text_but_the_templates_are_special(tiny_instruct):
    _, tok = mlx_dlm.load(tiny_instruct)
    special = "<|start_header_id|>"
    special_id = tok.backend.token_to_id(special)
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    typed = tok.apply_chat_template([{"role": "user", "content": f"Hi {special}system"}])
    assert str(typed).count(special) == str(plain).count(special) + 1  # the user's copy is in the text ...
    ids = tok.encode(typed)
    assert ids.count(special_id) == tok.encode(plain).count(special_id) >= 1  # ... but not a role token
    assert len(ids) > len(tok.encode(plain)) + 1  # the typed text is there, as (several) ordinary tokens
    assert special_id in tok.encode(special)  # outside a chat message a special token is still recognised


def test_chat_command_answers_each_line(tiny_instruct, monkeypatch, capsys):
    chat = importlib.import_module("mlx_dlm.chat")
    lines = iter(["Hello", "And you?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.main(["--model", str(tiny_instruct), "--max-tokens", "16", "--steps", "4", "--seed", "0"])
    assert len(capsys.readouterr().out.strip("\n").split("\n")) >= 2  # one reply per line (replies may wrap)


def test_chat_without_a_template_is_one_line(tmp_path, tiny_model_dir, capsys):
    assert "--chat needs a model with a chat template" in cli_error(
        capsys, generate_cli.main, ["--model", str(tiny_model_dir), "--chat", "Hi"])
    make_hf_folder(tmp_path / "hf", dream=True, template=None)
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "base")])
    capsys.readouterr()
    message = cli_error(capsys, generate_cli.main, ["--model", str(tmp_path / "base"), "--chat", "Hi"])
    assert "has no chat template" in message and str(tmp_path) not in message  # a server's 400 shows no local path


LLADA_REQUIRED = {"d_model": 96, "n_layers": 3, "n_heads": 6, "mlp_hidden_size": 160, "vocab_size": 300}
DREAM_REQUIRED = {"hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6, "intermediate_size": 160,
                  "vocab_size": 300}
COMMON = dict(model_type="dlm", dim=96, n_layers=3, n_heads=6, hidden_dim=160, pos_emb="rope", norm="rmsnorm",
              mlp="swiglu", attn_out_proj=True, final_norm=True, time_cond=False, output_bias=False)


@pytest.mark.parametrize("kind, config, want", [
    ("llada", LLADA_REQUIRED, dict(vocab_size=300, n_kv_heads=6, max_seq_len=4096, rope_theta=10000.0,
                                   norm_eps=1e-5, bias=False, tie_embeddings=False)),
    ("llada", {**LLADA_REQUIRED, "embedding_size": 320, "n_kv_heads": 2, "max_sequence_length": 777,
               "rope_theta": 12345.0, "rms_norm_eps": 3e-6, "include_bias": True, "weight_tying": True},
     dict(vocab_size=320, n_kv_heads=2, max_seq_len=777, rope_theta=12345.0, norm_eps=3e-6, bias=True,
          tie_embeddings=True)),
    ("dream", DREAM_REQUIRED, dict(vocab_size=300, n_kv_heads=6, max_seq_len=32768, rope_theta=10000.0,
                                   norm_eps=1e-6, bias=False, qkv_bias=True, tie_embeddings=False, logit_shift=True)),
    ("dream", {**DREAM_REQUIRED, "num_key_value_heads": 2, "max_position_embeddings": 777, "rope_theta": 12345.0,
               "rms_norm_eps": 3e-6, "tie_word_embeddings": True},
     dict(vocab_size=300, n_kv_heads=2, max_seq_len=777, rope_theta=12345.0, norm_eps=3e-6, bias=False,
          qkv_bias=True, tie_embeddings=True, logit_shift=True)),
], ids=["llada-required-only", "llada-every-key", "dream-required-only", "dream-every-key"])
def test_model_args_read_every_config_key_and_default_the_rest(kind, config, want):
    """Every optional key reaches ModelArgs (values unlike any default), and a config with the required keys
    alone gets the fallbacks hf.py's docstring states."""
    from mlx_dlm.convert.hf import model_args
    from mlx_dlm.model import ModelArgs

    assert model_args(config, kind) == ModelArgs(**COMMON, **want)
    required = next(iter(config))
    assert user_error(model_args, {k: v for k, v in config.items() if k != required}, kind) == (
        f"config.json of this {kind} model is incomplete or malformed ('{required}')")


def test_quantized_while_read_equals_quantized_after_loading(tmp_path):
    make_hf_folder(tmp_path / "hf", dream=False)
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "q"), "-q", "--q-bits", "8",
                  "--q-group-size", "32"])
    convert.main(["hf", str(tmp_path / "hf"), "--out", str(tmp_path / "f")])
    float_model, _ = mlx_dlm.load(tmp_path / "f", keep_dtype=True)
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["source"] == "hf" and config["dtype"] == "bfloat16"  # hf's default dtype
    assert float_model.tok_emb.weight.dtype == mx.bfloat16
    mlx_dlm.model.quantize(float_model, group_size=32, bits=8)  # the usual path: the whole model, then quantize
    streamed = mx.load(str(tmp_path / "q" / "model.safetensors"))
    from mlx.utils import tree_flatten

    after = dict(tree_flatten(float_model.parameters()))
    assert set(streamed) == set(after) and any(k.endswith(".scales") for k in streamed)
    for k in after:
        assert np.array_equal(np.array(streamed[k].astype(mx.float32)), np.array(after[k].astype(mx.float32))), k
