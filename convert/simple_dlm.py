"""simple_dlm (github.com/Encrux/simple_dlm) state dicts -> the `simple_dlm` layout of mlx_dlm.

Each layer is a ModuleList; the current revision is
[LayerNorm, Linear(d, 3d) fused QKV, LayerNorm, Linear(d, 4d), ReLU, Linear(4d, d)] and an older one
[LayerNorm, Linear W_Q, Linear W_K, Linear W_V, LayerNorm, Linear(d, 4d), ReLU, Linear(4d, d)].
The checkpoint has no vocabulary: it is rebuilt from the training text ([MASK] = 0, sorted chars from 1).
"""

from __future__ import annotations

import re

import numpy as np

from mlx_dlm.errors import UserError
from mlx_dlm.model import ModelArgs, preset_args
from mlx_dlm.tokenizer import CharTokenizer

from .torch_files import check_keys

# module index in a layer's ModuleList -> our name, per revision
FUSED = {0: "attn_norm", 1: "attn.qkv", 2: "mlp_norm", 3: "mlp.fc1", 5: "mlp.fc2"}
SEPARATE_QKV = {0: "attn_norm", 1: "q", 2: "k", 3: "v", 4: "mlp_norm", 5: "mlp.fc1", 7: "mlp.fc2"}


def _expected_keys(n_layers: int, layout: dict[int, str]) -> set[str]:
    keys = {"token_emb", "pos_emb", "mask_prob_emb.weight", "mask_prob_emb.bias", "output.weight", "output.bias"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.{j}.{p}" for j in layout for p in ("weight", "bias")}
    return keys


def convert(state: dict[str, np.ndarray], tokenizer: CharTokenizer) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """(ModelArgs, mlx weights) from a simple_dlm state dict; checks the vocabulary size."""
    if "token_emb" not in state:
        check_keys("simple_dlm", set(state), _expected_keys(0, FUSED))
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    if not layer_ids:
        raise UserError("this simple_dlm checkpoint has no layers (no layers.N.* keys)")
    n_layers = max(layer_ids) + 1
    modules = {int(m.group(1)) for k in state if (m := re.match(r"layers\.0\.(\d+)\.", k))}
    layout = SEPARATE_QKV if modules == set(SEPARATE_QKV) else FUSED
    check_keys("simple_dlm", set(state), _expected_keys(n_layers, layout))

    vocab, dim = state["token_emb"].shape
    if vocab != tokenizer.vocab_size:
        raise UserError(f"the checkpoint has {vocab} tokens but --text gives {tokenizer.vocab_size} "
                        f"({tokenizer.vocab_size - 1} characters + [MASK]): pass the text it was trained on")
    hidden = state[f"layers.0.{'5' if layout is SEPARATE_QKV else '3'}.weight"].shape[0]
    args = preset_args("simple_dlm", vocab_size=vocab, dim=dim, n_layers=n_layers, hidden_dim=hidden,
                       max_seq_len=state["pos_emb"].shape[0])

    weights = {"tok_emb.weight": state["token_emb"], "pos_emb": state["pos_emb"],
               "t_proj.weight": state["mask_prob_emb.weight"], "t_proj.bias": state["mask_prob_emb.bias"],
               "lm_head.weight": state["output.weight"], "lm_head.bias": state["output.bias"]}
    for i in range(n_layers):
        for j, name in layout.items():
            for p in ("weight", "bias"):
                weights[f"layers.{i}.{name}.{p}"] = state[f"layers.{i}.{j}.{p}"]
        if layout is SEPARATE_QKV:  # stack W_Q, W_K, W_V into the fused projection
            for p in ("weight", "bias"):
                weights[f"layers.{i}.attn.qkv.{p}"] = np.concatenate(
                    [weights.pop(f"layers.{i}.{n}.{p}") for n in ("q", "k", "v")], axis=0)
    return args, weights
