"""nanoGPT (github.com/karpathy/nanoGPT) character-level checkpoints -> a causal mlx_dlm model.

ckpt.pt holds `model` (state dict, maybe with torch.compile's `_orig_mod.` prefix) and `model_args`;
the vocabulary is in the dataset's meta.pkl (`stoi`, `itos`). Our character tokenizer keeps id 0 for
[MASK], so embedding rows move up by one and id 0 gets a zero row the sampler never draws.
"""

from __future__ import annotations

import numpy as np

from mlx_dlm.errors import UserError
from mlx_dlm.model import ModelArgs
from mlx_dlm.tokenizer import CharTokenizer

from .torch_files import check_keys

PREFIX = "_orig_mod."


def tokenizer_from_meta(meta: object) -> tuple[CharTokenizer, dict[str, int]]:
    """CharTokenizer of meta.pkl's characters, and nanoGPT's char -> id map."""
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict):
        raise UserError("meta.pkl has no `stoi` character table (only character-level nanoGPT models convert)")
    stoi = meta["stoi"]
    if not all(isinstance(c, str) and len(c) == 1 and isinstance(i, int) for c, i in stoi.items()):
        raise UserError("meta.pkl `stoi` must map single characters to integer ids")
    return CharTokenizer(list(stoi)), stoi


def _expected_keys(n_layer: int, bias: bool) -> set[str]:
    ps = ("weight", "bias") if bias else ("weight",)
    keys = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    keys |= {f"transformer.ln_f.{p}" for p in ps}
    for i in range(n_layer):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"transformer.h.{i}.{m}.{p}" for p in ps}
    return keys


def convert(ckpt: dict, tokenizer: CharTokenizer, stoi: dict[str, int],
            to_numpy) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """(ModelArgs, mlx weights) from a nanoGPT checkpoint dict."""
    if "model" not in ckpt or "model_args" not in ckpt:
        raise UserError("not a nanoGPT checkpoint: expected a dict with `model` and `model_args`")
    margs = ckpt["model_args"]
    try:
        n_layer, n_head, n_embd = int(margs["n_layer"]), int(margs["n_head"]), int(margs["n_embd"])
        block_size, bias = int(margs["block_size"]), bool(margs.get("bias", True))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"nanoGPT model_args is incomplete ({err})") from None
    state = {k.removeprefix(PREFIX): v for k, v in to_numpy(ckpt["model"]).items()}
    # Older nanoGPT (no flash attention) also saved the causal-mask buffers.
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    check_keys("nanoGPT", set(state), _expected_keys(n_layer, bias))

    wte = state["transformer.wte.weight"]
    tied = np.array_equal(state["lm_head.weight"], wte)
    vocab = int(margs.get("vocab_size", wte.shape[0]))
    if vocab != len(stoi) or wte.shape[0] != len(stoi) or max(stoi.values()) >= len(stoi):
        raise UserError(f"the checkpoint's vocabulary has {vocab} tokens but meta.pkl has {len(stoi)} characters: "
                        "only character-level nanoGPT checkpoints convert, with the meta.pkl of their own dataset")
    # Row of each of our ids (1..V) in nanoGPT's table; id 0 ([MASK]) gets zeros.
    rows = np.array([stoi[c] for c in tokenizer.chars])

    def reindex(table: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros((1, table.shape[1]), table.dtype), table[rows]])

    args = ModelArgs(model_type="ar", vocab_size=tokenizer.vocab_size, dim=n_embd, n_layers=n_layer,
                     n_heads=n_head, hidden_dim=state["transformer.h.0.mlp.c_fc.weight"].shape[0],
                     max_seq_len=block_size, pos_emb="learned", norm="layernorm", mlp="gelu", bias=bias,
                     attn_out_proj=True, final_norm=True, time_cond=False, output_bias=False, tie_embeddings=tied)
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "ln_2": "mlp_norm",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    weights = {"tok_emb.weight": reindex(wte), "pos_emb": state["transformer.wpe.weight"]}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("transformer.h."):
            i, module, p = parts[2], ".".join(parts[3:-1]), parts[-1]
            weights[f"layers.{i}.{names[module]}.{p}"] = value
        elif key.startswith("transformer.ln_f."):
            weights[f"norm.{parts[-1]}"] = value
    if not tied:
        weights["lm_head.weight"] = reindex(state["lm_head.weight"])
    return args, weights
