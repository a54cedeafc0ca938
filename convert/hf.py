"""Hugging Face diffusion LLMs -> the one mlx_dlm Transformer: LLaDA and Dream.

    mlx_dlm.convert hf GSAI-ML/LLaDA-8B-Instruct --out models/llada-8b-instruct-4bit -q --q-bits 4

SRC is a local Hugging Face model folder or a Hub repo id (`snapshot_download`, the local cache when offline).
config.json names the family:
- LLaDA (`llada`): RMSNorm, SwiGLU `ff_out(silu(ff_proj(x)) * up_proj(x))`, RoPE (theta from the config,
  non-interleaved), bidirectional GQA attention, no biases, untied `ff_out` head; logits at i predict token i.
- Dream (`dream`, Qwen2's layout): q/k/v projections with bias, `o_proj` without, RMSNorm, SwiGLU, RoPE, GQA;
  its logits at i predict token i+1, so the model shifts them home (`logit_shift`) and the sampler stays the same.
Optional config keys, when absent: no GQA (as many key/value heads as heads), RoPE theta 10000, no biases
(LLaDA's include_bias), untied head; LLaDA: embedding_size rows (the padded table) or else vocab_size, context
4096, RMSNorm eps 1e-5; Dream: context 32768, eps 1e-6.
Shards are read one at a time (`model.safetensors.index.json`), so the model is never held twice; q, k and v
of a layer are fused into our one projection as soon as all three have been read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_dlm.errors import UserError
from mlx_dlm.model import ModelArgs

from .torch_files import first_line

HF_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "*.jinja"]
SUPPORTED = ("llada", "dream")


def resolve_source(src: str) -> Path:
    """A local folder, or the Hub snapshot of a repo id (downloaded, or the cache when HF_HUB_OFFLINE=1)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{src} is a file; give a Hugging Face model folder or a repo id (user/name)")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise UserError(f"{src} is not a folder, and does not look like a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=HF_PATTERNS))
    except Exception as err:  # offline without a cache, unknown repo, network errors
        raise UserError(f"cannot get {src} from the Hugging Face Hub or its cache ({first_line(err)})") from None


def read_config(folder: Path) -> dict:
    """config.json of a Hugging Face model folder."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder") from None
    except ValueError as err:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({err})") from None
    return config


def family(config: dict) -> str:
    """"llada" or "dream", from config.json's model_type."""
    kind = str(config.get("model_type", "")).lower()
    if kind not in SUPPORTED:
        raise UserError(f"unsupported model_type {config.get('model_type')!r} in config.json "
                        f"(supported: {', '.join(SUPPORTED)})")
    return kind


def model_args(config: dict, kind: str) -> ModelArgs:
    """Our ModelArgs for a LLaDA or Dream config.json."""
    try:
        if kind == "llada":
            return ModelArgs(model_type="dlm", vocab_size=int(config.get("embedding_size") or config["vocab_size"]),
                             dim=int(config["d_model"]), n_layers=int(config["n_layers"]),
                             n_heads=int(config["n_heads"]), n_kv_heads=int(config.get("n_kv_heads") or config["n_heads"]),
                             hidden_dim=int(config["mlp_hidden_size"]),
                             max_seq_len=int(config.get("max_sequence_length", 4096)), pos_emb="rope",
                             rope_theta=float(config.get("rope_theta", 10000.0)), norm="rmsnorm",
                             norm_eps=float(config.get("rms_norm_eps", 1e-5)), mlp="swiglu",
                             bias=bool(config.get("include_bias", False)), attn_out_proj=True, final_norm=True,
                             time_cond=False, output_bias=False, tie_embeddings=bool(config.get("weight_tying", False)))
        return ModelArgs(model_type="dlm", vocab_size=int(config["vocab_size"]), dim=int(config["hidden_size"]),
                         n_layers=int(config["num_hidden_layers"]), n_heads=int(config["num_attention_heads"]),
                         n_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                         hidden_dim=int(config["intermediate_size"]),
                         max_seq_len=int(config.get("max_position_embeddings", 32768)), pos_emb="rope",
                         rope_theta=float(config.get("rope_theta", 10000.0)), norm="rmsnorm",
                         norm_eps=float(config.get("rms_norm_eps", 1e-6)), mlp="swiglu", bias=False, qkv_bias=True,
                         attn_out_proj=True, final_norm=True, time_cond=False, output_bias=False,
                         tie_embeddings=bool(config.get("tie_word_embeddings", False)), logit_shift=True)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"config.json of this {kind} model is incomplete or malformed ({err})") from None


# HF key (after the family's prefix) -> our key, per family; q/k/v are fused afterwards.
_LAYER = {
    "llada": re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$"),
    "dream": re.compile(r"model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+|\w+)\.(weight|bias)$"),
}
_LAYER_NAMES = {
    "llada": {"attn_norm": "attn_norm", "q_proj": "q", "k_proj": "k", "v_proj": "v", "attn_out": "attn.out_proj",
              "ff_norm": "mlp_norm", "ff_proj": "mlp.gate", "up_proj": "mlp.fc1", "ff_out": "mlp.fc2"},
    "dream": {"input_layernorm": "attn_norm", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
              "self_attn.v_proj": "v", "self_attn.o_proj": "attn.out_proj", "post_attention_layernorm": "mlp_norm",
              "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"},
}
_TOP = {
    "llada": {"model.transformer.wte.weight": "tok_emb.weight", "model.transformer.ln_f.weight": "norm.weight",
              "model.transformer.ff_out.weight": "lm_head.weight"},
    "dream": {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"},
}


def our_key(kind: str, key: str) -> str | None:
    """Our parameter name for a checkpoint key ("layers.N.q.weight" style for parts still to be fused);
    None for buffers we do not need (rotary caches)."""
    if key in _TOP[kind]:
        return _TOP[kind][key]
    m = _LAYER[kind].match(key)
    if m and m.group(2) in _LAYER_NAMES[kind]:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[kind][m.group(2)]}.{m.group(3)}"
    if key.endswith(("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")):
        return None
    raise UserError(f"unexpected key {key} for a {kind} checkpoint")


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, checked against the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise UserError(f"{index} is not a valid safetensors index ({err})") from None
        root = folder.resolve()
        outside = [n for n in names if not isinstance(n, str) or root not in (folder / n).resolve().parents]
        if outside:  # a hostile index could pull any local file into the converted (and uploaded) model
            raise UserError(f"model.safetensors.index.json names a shard outside the model folder: {outside[0]!r}")
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise UserError(f"missing shard {missing[0]} in {folder} (listed in model.safetensors.index.json)")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights")
    return files


def quantizer(model, group_size: int, bits: int):
    """finish(name, array) for read_weights: the weights of the modules that `mlx_dlm.model.quantize` made
    quantized become (weight, scales, biases) at once, so the float weights are never all held together."""
    quantized = {path for path, module in model.named_modules() if isinstance(module, (nn.QuantizedLinear,
                                                                                          nn.QuantizedEmbedding))}

    def finish(name: str, value: mx.array) -> dict[str, mx.array]:
        module = name.rsplit(".", 1)[0]
        if module not in quantized or not name.endswith(".weight"):
            return {name: value}
        wq, scales, biases = mx.quantize(value, group_size=group_size, bits=bits)
        return {name: wq, f"{module}.scales": scales, f"{module}.biases": biases}

    return finish


def read_weights(folder: Path, kind: str, args: ModelArgs, dtype: mx.Dtype, finish=None) -> dict[str, mx.array]:
    """Our weights, read shard by shard (each shard's arrays are converted and evaluated before the next).

    finish(name, array) -> {name: array, ...} is applied to each weight once complete (see `quantizer`)."""
    finish = finish or (lambda name, value: {name: value})
    weights, pending = {}, {}
    for shard in shard_files(folder):
        try:
            arrays = mx.load(str(shard))
        except (RuntimeError, ValueError, OSError) as err:
            raise UserError(f"{shard} is not a readable safetensors file ({err})") from None
        for key in list(arrays):
            name = our_key(kind, key)
            value = arrays.pop(key)
            if name is None:
                continue
            parts = name.split(".")
            if parts[0] == "layers" and parts[2] in ("q", "k", "v"):
                layer = pending.setdefault((parts[1], parts[3]), {})
                layer[parts[2]] = value.astype(dtype)
                if len(layer) == 3:  # fuse as soon as q, k and v of this layer are all read
                    weights.update(finish(f"layers.{parts[1]}.attn.qkv.{parts[3]}",
                                          mx.concatenate([layer["q"], layer["k"], layer["v"]], axis=0)))
                    del pending[(parts[1], parts[3])]
            elif not (name == "lm_head.weight" and args.tie_embeddings):
                weights.update(finish(name, value.astype(dtype)))
        mx.eval(list(weights.values()))
    if pending:
        (layer, param), parts = next(iter(pending.items()))
        raise UserError(f"layer {layer} lacks its {', '.join(sorted({'q', 'k', 'v'} - set(parts)))} projection "
                        f"{param}: a shard is missing or the checkpoint is incomplete")
    return weights
