"""`mlx_dlm.export onnx`: a diffusion model as ONNX with simple_dlm's contract, for the web or any ONNX runtime.

    mlx_dlm.export onnx --model shakespeare-dlm --out web/public

Writes `model.onnx` (inputs `tokens` int64 (seq,) and `mask_prob` float32 (1,), output `logits` float32 (seq, V);
the sequence length is dynamic) and `vocab.json` (the tokens in id order; id 0 is the mask), as simple_dlm's
`export_onnx.py` does. The graph is written op by op from the model's `ModelArgs` (opset 17) with the `onnx`
package (extra `onnx`): learned or rotary positions, LayerNorm or RMSNorm, ReLU/GELU/SwiGLU, grouped-query
attention, time conditioning, tied or untied heads. Autoregressive and quantized models are refused.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import UserError, run_cli
from .fileio import atomic_write, atomic_write_text, ensure_dir
from .io import load

OPSET = 17


class _Graph:
    """Collects nodes and float32 initializers with unique names."""

    def __init__(self, helper):
        self.helper, self.nodes, self.inits, self.count, self.names = helper, [], [], 0, set()

    def const(self, name: str, array) -> str:
        """An initializer; a name already given is reused (shared shapes and scalars)."""
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, kind: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self.count += 1
        names = [f"{kind.lower()}_{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(kind, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def build(model, tokenizer):
    """The ONNX ModelProto of a diffusion model (see the module docstring)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'mlx-dlm[onnx]'") from None
    a = model.args
    if a.model_type != "dlm":
        kind = {"ar": "autoregressive", "block": "a block-diffusion model (its decoding needs a KV cache and a "
                "block mask, which this graph does not take)"}.get(a.model_type, a.model_type)
        raise UserError("ONNX export covers full-sequence diffusion models (simple_dlm's contract: tokens and mask "
                        f"ratio in); this model is {kind}")
    W = _weights(model)
    if any(k.endswith(".scales") for k in W):
        raise UserError("ONNX export of quantized weights is not supported: export the float model (convert "
                        "without -q)")
    g = _Graph(helper)
    H, KV, hd, d = a.n_heads, a.kv_heads, a.head_dim, a.dim
    x = g.op("Gather", g.const("tok_emb", W["tok_emb.weight"]), "tokens", axis=0)  # (seq, d)
    seq = g.op("Shape", "tokens")  # (1,) = [seq]
    zero, axis0 = g.const("zero", np.array([0], np.int64)), g.const("axis0", np.array([0], np.int64))
    if a.pos_emb == "learned":
        x = g.op("Add", x, g.op("Slice", g.const("pos_emb", W["pos_emb"]), zero, seq, axis0))
    else:  # rotary tables for every position, sliced to the sequence
        freqs = a.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        angles = np.arange(a.max_seq_len)[:, None] * freqs[None, :]
        cos = g.op("Slice", g.const("rope_cos", np.cos(np.concatenate([angles, angles], 1)).astype(np.float32)),
                   zero, seq, axis0)
        sin = g.op("Slice", g.const("rope_sin", np.sin(np.concatenate([angles, angles], 1)).astype(np.float32)),
                   zero, seq, axis0)
    if a.time_cond:
        t = g.op("Reshape", "mask_prob", g.const("shape_1_1", np.array([1, 1], np.int64)))
        x = g.op("Add", x, g.op("Add", g.op("MatMul", t, g.const("t_w", W["t_proj.weight"].T)),
                                g.const("t_b", W["t_proj.bias"])))

    def linear(h, name):
        out = g.op("MatMul", h, g.const(f"{name}.wT", W[f"{name}.weight"].T))
        return g.op("Add", out, g.const(f"{name}.b", W[f"{name}.bias"])) if f"{name}.bias" in W else out

    def norm(h, name):
        w = g.const(f"{name}.w", W[f"{name}.weight"])
        if a.norm == "layernorm":
            b = g.const(f"{name}.b", W.get(f"{name}.bias", np.zeros(d, np.float32)))
            return g.op("LayerNormalization", h, w, b, axis=-1, epsilon=a.norm_eps)
        mean = g.op("ReduceMean", g.op("Mul", h, h), axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.const(f"{name}.eps", np.float32(a.norm_eps)))))
        return g.op("Mul", g.op("Mul", h, inv), w)

    def heads(h, n):  # (seq, n*hd) -> (n, seq, hd)
        return g.op("Transpose", g.op("Reshape", h, g.const(f"shape_heads_{n}", np.array([-1, n, hd], np.int64))),
                    perm=[1, 0, 2])

    def rope(h):
        first, second = g.op("Split", h, g.const("halves", np.array([hd // 2, hd // 2], np.int64)), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
        return g.op("Add", g.op("Mul", h, cos), g.op("Mul", rotated, sin))

    for i in range(a.n_layers):
        p = f"layers.{i}"
        qkv = linear(norm(x, f"{p}.attn_norm"), f"{p}.attn.qkv")
        q, k, v = g.op("Split", qkv, g.const(f"{p}.split", np.array([d, KV * hd, KV * hd], np.int64)), axis=-1,
                       outputs=3)
        q, k, v = heads(q, H), heads(k, KV), heads(v, KV)
        if a.pos_emb == "rope":
            q, k = rope(q), rope(k)
        if KV != H:  # each key/value head serves H / KV query heads
            group = g.const("shape_group", np.array([KV, H // KV, 1, 1], np.int64))
            expand = lambda z: g.op("Reshape", g.op("Expand", g.op("Unsqueeze", z, g.const("axis1", np.array([1], np.int64))), group),  # noqa: E731,E501
                                    g.const("shape_h_seq_hd", np.array([H, -1, hd], np.int64)))
            k, v = expand(k), expand(v)
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 2, 1])),
                      g.const("attn_scale", np.float32(hd ** -0.5)))
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # (H, seq, hd)
        out = g.op("Reshape", g.op("Transpose", out, perm=[1, 0, 2]), g.const("shape_seq_d", np.array([-1, d], np.int64)))
        if a.attn_out_proj:
            out = linear(out, f"{p}.attn.out_proj")
        x = g.op("Add", x, out)
        h = norm(x, f"{p}.mlp_norm")
        if a.mlp == "swiglu":
            gate = linear(h, f"{p}.mlp.gate")
            h = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), linear(h, f"{p}.mlp.fc1"))
        elif a.mlp == "relu":
            h = g.op("Relu", linear(h, f"{p}.mlp.fc1"))
        else:  # exact GELU: x * (1 + erf(x / sqrt 2)) / 2
            z = linear(h, f"{p}.mlp.fc1")
            erf = g.op("Erf", g.op("Mul", z, g.const("inv_sqrt2", np.float32(1 / math.sqrt(2)))))
            h = g.op("Mul", g.op("Mul", z, g.op("Add", erf, g.const("one", np.float32(1.0)))),
                     g.const("half", np.float32(0.5)))
        x = g.op("Add", x, linear(h, f"{p}.mlp.fc2"))
    if a.final_norm:
        x = norm(x, "norm")
    logits = g.op("MatMul", x, g.const("tok_emb_T", W["tok_emb.weight"].T)) if a.tie_embeddings else linear(x, "lm_head")
    if a.logit_shift:  # position i's prediction sits at i-1
        head = g.op("Slice", logits, zero, g.const("one_i", np.array([1], np.int64)), axis0)
        body = g.op("Slice", logits, zero, g.const("minus_one", np.array([-1], np.int64)), axis0)
        logits = g.op("Concat", head, body, axis=0)
    if a.subs_mask_id is not None:  # SUBS: the mask id never gets probability
        banned = np.zeros(a.vocab_size, np.float32)
        banned[a.subs_mask_id] = -np.inf
        logits = g.op("Add", logits, g.const("subs_banned", banned))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(
        g.nodes, "mlx_dlm", [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["seq"]),
                             helper.make_tensor_value_info("mask_prob", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["seq", a.vocab_size])], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mlx_dlm")
    proto.ir_version = 8  # readable by onnxruntime releases of the last years
    onnx.checker.check_model(proto)
    return proto


def vocabulary(tokenizer) -> list[str]:
    """The tokens in id order (id 0, the mask, as "[MASK]"), as simple_dlm's vocab.json lists them."""
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def export_onnx(model_path: str, out: str) -> Path:
    """Write model.onnx and vocab.json for a model directory (or shipped name) into out."""
    model, tokenizer = load(model_path)
    proto = build(model, tokenizer)
    out = ensure_dir(out, "--out")
    atomic_write(out / "model.onnx", lambda tmp: Path(tmp).write_bytes(proto.SerializeToString()))
    atomic_write_text(out / "vocab.json", json.dumps(vocabulary(tokenizer), ensure_ascii=False))
    return out


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.export."""
    p = argparse.ArgumentParser(prog="mlx_dlm.export", description="Export a model for other runtimes.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("format", choices=("onnx",), help="what to write")
    p.add_argument("--model", required=True, help="model directory or shipped model name")
    p.add_argument("--out", required=True, help="folder for model.onnx and vocab.json")
    return p


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    out = export_onnx(args.model, args.out)
    size = (out / "model.onnx").stat().st_size
    print(f"Wrote {out / 'model.onnx'} ({size / 1e6:.2f} MB) and {out / 'vocab.json'}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
