"""One configurable Transformer: the exact simple_dlm layout or a modern one.

Diffusion models (model_type "dlm") attend bidirectionally and are told the mask
ratio t; autoregressive models (model_type "ar") use a causal mask; block-diffusion
models (model_type "block", `block_size` B) attend as their caller's mask says
(`diffusion.block_attention_mask`: bidirectional inside a block of B, causal across blocks).
A caller may pass `copies` > 1: the tokens are that many copies of one window laid side
by side, each at the same positions (block diffusion's [noisy; clean] layout).
A feature drafter (a block model with `feature_dim`) adds a map of its verifier's state to every
position; a chained one also holds a table of logit biases for its rows after the first
(`draft_context`, `Model.chain_bias`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError

MEMO_ATTRIBUTE = "_mlx_dlm_sampling"  # where memoize_on_model keeps what it built


MODEL_TYPES = ("dlm", "ar", "block")


@dataclass
class ModelArgs:
    """Architecture; saved as config.json in a model directory."""

    model_type: str = "dlm"  # "dlm" (bidirectional, t-conditioned), "ar" (causal) or "block" (block diffusion)
    vocab_size: int = 66
    dim: int = 256
    n_layers: int = 10
    n_heads: int = 1
    n_kv_heads: int | None = None  # fewer key/value heads than query heads (GQA); None: as many as n_heads
    hidden_dim: int = 1024
    max_seq_len: int = 1024  # context: longest sequence the model takes (rows of a learned position table)
    pos_emb: str = "learned"  # "learned" or "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "relu"  # "relu", "gelu" or "swiglu"
    bias: bool = True  # biases in attention, MLP and LayerNorm
    qkv_bias: bool | None = None  # biases on the query/key/value projection alone (Qwen2/Dream); None: as bias
    attn_out_proj: bool = False
    final_norm: bool = False
    time_cond: bool = True  # add Linear(1, dim)(t) to every position
    output_bias: bool = True
    tie_embeddings: bool = False
    logit_shift: bool = False  # Dream: position i's logits come from hidden state i-1 (position 0 from its own);
    # block models: applied by diffusion.shifted_block_logits (a block's first position from the clean copy)
    block_size: int = 0  # block models: positions denoised together (B); 0 for the others
    feature_dim: int = 0  # a drafter that reads its verifier's state (DFlash-style): Linear(feature_dim, dim) of
    # the AR model's hidden states is added to every position, as t is; 0 for the others
    feature_layers: tuple[int, ...] = ()  # a feature drafter: the verifier's layers whose outputs it reads, side by
    # side (the last one's as its head reads it); () for the last alone
    draft_context: int = 0  # a chained feature drafter: each drafted row after the first adds a learned logit bias
    # indexed by the draft_context tokens before it (the round's drawn token, the earlier drafts), drawn in turn;
    # 0: the rows are drawn independently
    dropout: float = 0.0  # residual dropout on the embeddings and each block's outputs while training
    subs_mask_id: int | None = None  # MDLM's SUBS: this (mask) id gets logit -inf, never probability

    def __post_init__(self) -> None:
        choices = {"model_type": MODEL_TYPES, "pos_emb": ("learned", "rope"),
                   "norm": ("layernorm", "rmsnorm"), "mlp": ("relu", "gelu", "swiglu")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise UserError(f"model config: {field} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, field)!r}")
        if self.model_type in ("ar", "block"):
            self.time_cond = False  # not told a mask ratio (a block model has one per block)
        if (self.model_type == "block") != (self.block_size >= 1) or self.block_size < 0:
            raise UserError(f"model config: block_size must be at least 1 for a block model and 0 otherwise, "
                            f"got {self.block_size} for model_type {self.model_type!r}")
        if self.dim % self.n_heads:
            raise UserError(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise UserError(f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        self.feature_layers = tuple(self.feature_layers)  # JSON gives a list
        if self.feature_layers and not self.feature_dim:
            raise UserError("model config: feature_layers names what a feature drafter reads; feature_dim is 0")
        if self.feature_dim < 0 or (self.feature_dim and self.model_type != "block"):
            raise UserError(f"model config: feature_dim must be 0, or positive for a block model (a drafter), got "
                            f"{self.feature_dim} for model_type {self.model_type!r}")
        if self.draft_context not in (0, 1, 2) or (self.draft_context and not self.feature_dim):
            raise UserError(f"model config: draft_context must be 0, or 1 or 2 for a feature drafter, got "
                            f"{self.draft_context}")
        if self.subs_mask_id is not None and not 0 <= self.subs_mask_id < self.vocab_size:
            raise UserError(f"model config: subs_mask_id {self.subs_mask_id} is not a token id of the vocabulary "
                            f"of {self.vocab_size}")

    @property
    def verifier_hidden(self) -> bool | tuple[int, ...]:
        """A feature drafter's reading of its verifier: the `hidden=` of the verifier's call."""
        return self.feature_layers or True

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_kv_heads, or n_heads without GQA)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Build from a config dict, ignoring keys that are not architecture."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # Fast CPU checks: a few seconds per hundred steps.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=192, max_seq_len=256, pos_emb="rope",
                 norm="rmsnorm", mlp="swiglu", bias=False, attn_out_proj=True, final_norm=True,
                 output_bias=False),
    # The reference model of simple_dlm, exactly (a position table of 1024 rows; trained on 128).
    "simple_dlm": dict(dim=256, n_layers=10, n_heads=1, hidden_dim=1024, max_seq_len=1024,
                       pos_emb="learned", norm="layernorm", mlp="relu", bias=True,
                       attn_out_proj=False, final_norm=False, output_bias=True),
    # The default: simple_dlm's layout with RoPE instead of the learned table, 4 heads of 64 and no time
    # conditioning (learns fastest per FLOP at this size; measured in docs/benchmarks.md, "Learning speed").
    "base": dict(dim=256, n_layers=10, n_heads=4, hidden_dim=1024, max_seq_len=1024, pos_emb="rope",
                 norm="layernorm", mlp="relu", bias=True, attn_out_proj=False, final_norm=False, output_bias=True,
                 time_cond=False),
    "small": dict(dim=384, n_layers=8, n_heads=6, hidden_dim=1024, max_seq_len=1024, pos_emb="rope",
                  norm="rmsnorm", mlp="swiglu", bias=False, attn_out_proj=True, final_norm=True,
                  output_bias=False),
}


def preset_args(name: str, **overrides) -> ModelArgs:
    """ModelArgs of a named preset, with overrides (vocab_size, max_seq_len, model_type, ...)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return ModelArgs(**{**PRESETS[name], **overrides})


def _norm(args: ModelArgs) -> nn.Module:
    if args.norm == "rmsnorm":
        return nn.RMSNorm(args.dim, eps=args.norm_eps)
    return nn.LayerNorm(args.dim, eps=args.norm_eps, bias=args.bias)


class Attention(nn.Module):
    """Multi-head attention (grouped-query when n_kv_heads < n_heads) with one fused q/k/v projection."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.scale = self.head_dim ** -0.5
        self.causal = args.model_type == "ar"
        kv_dim = self.n_kv_heads * self.head_dim
        self.qk_width = args.dim + kv_dim  # q | k | v along the projection's output: q and k end here
        self.qkv = nn.Linear(args.dim, args.dim + 2 * kv_dim, bias=args.bias if args.qkv_bias is None else args.qkv_bias)
        self.out_proj = nn.Linear(args.dim, args.dim, bias=args.bias) if args.attn_out_proj else None
        self.rope = nn.RoPE(self.head_dim, base=args.rope_theta) if args.pos_emb == "rope" else None

    def _rope(self, a: mx.array, offset, copies: int) -> mx.array:
        """Rotary positions from the offset; with copies > 1 each copy of the window starts at the offset."""
        if copies == 1:
            return self.rope(a, offset=offset)
        B, H, L, D = a.shape
        return self.rope(a.reshape(B, H, copies, L // copies, D), offset=offset).reshape(B, H, L, D)

    def __call__(self, x: mx.array, cache: "KVCache | None", layer: int, attn_mask: mx.array | None = None,
                 copies: int = 1) -> mx.array:
        B, L, D = x.shape
        qk, v = mx.split(self.qkv(x), [self.qk_width], axis=-1)
        heads = self.n_heads + self.n_kv_heads  # the query heads, then the key heads
        qk = qk.reshape(B, L, heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0  # per row (B,): RoPE takes one offset per row
        if self.rope is not None:  # queries and keys in one call: on the CPU each call is a chain of small kernels
            qk = self._rope(qk, offset, copies)
        q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]
        mask = attn_mask  # the caller's (block diffusion), over the cache's buffer when there is one
        if cache is None:
            mask = "causal" if self.causal and mask is None else mask
        else:  # attend over the preallocated buffer: causal models mask what is not yet written,
            k, v = cache.update(layer, k, v)  # a diffusion model's buffer holds exactly its sequence
            if self.causal and mask is None:
                mask = cache.visible(cache.positions(L) + 1)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, D)
        return self.out_proj(out) if self.out_proj is not None else out


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.kind = args.mlp
        if args.mlp == "swiglu":
            self.gate = nn.Linear(args.dim, args.hidden_dim, bias=args.bias)
        self.fc1 = nn.Linear(args.dim, args.hidden_dim, bias=args.bias)
        self.fc2 = nn.Linear(args.hidden_dim, args.dim, bias=args.bias)

    def __call__(self, x: mx.array) -> mx.array:
        if self.kind == "swiglu":
            return self.fc2(nn.silu(self.gate(x)) * self.fc1(x))
        act = nn.relu if self.kind == "relu" else nn.gelu
        return self.fc2(act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = _norm(args)
        self.attn = Attention(args)
        self.mlp_norm = _norm(args)
        self.mlp = MLP(args)
        self.drop = nn.Dropout(args.dropout)  # no parameters; the identity at 0 or in eval mode

    def __call__(self, x: mx.array, cache: "KVCache | None", layer: int, attn_mask: mx.array | None = None,
                 copies: int = 1) -> mx.array:
        x = x + self.drop(self.attn(self.attn_norm(x), cache, layer, attn_mask, copies))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class KVCache:
    """Preallocated keys and values of every layer for `size` positions (fixed shapes: decode compiles once).

    `state` (offset and buffers) is what a compiled decode step lists as inputs and outputs. The offset is one
    number for the whole batch, or with per_row one per row (B,): rows then hold texts of different lengths
    (batched speculative decoding), each written, positioned and masked at its own offset.
    """

    def __init__(self, args: ModelArgs, batch_size: int, size: int, per_row: bool = False):
        shape = (batch_size, args.kv_heads, size, args.head_dim)  # float32 whatever the weights' dtype
        self.state = {"offset": mx.zeros((batch_size,) if per_row else (), dtype=mx.int32),
                      "keys": [mx.zeros(shape) for _ in range(args.n_layers)],
                      "values": [mx.zeros(shape) for _ in range(args.n_layers)]}

    @property
    def offset(self) -> mx.array:
        """Number of positions already written: () or, per row, (B,)."""
        return self.state["offset"]

    @property
    def size(self) -> int:
        return self.state["keys"][0].shape[2]

    @property
    def row_offset(self) -> mx.array:
        """The offset shaped to add to a row of positions: () or, per row, (B, 1)."""
        return self.offset[:, None] if self.offset.ndim else self.offset

    def positions(self, length: int) -> mx.array:
        """Positions of `length` new rows written at the offset: (length,), or per row (B, length)."""
        return self.row_offset + mx.arange(length)

    def visible(self, ends: mx.array) -> mx.array:
        """Attention mask over the buffer: each row sees the slots before its end. ends: (L,) -> (L, size), or per
        row (B, L) -> (B, 1, L, size)."""
        mask = mx.arange(self.size) < ends[..., None]
        return mask[:, None] if mask.ndim == 3 else mask

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write new keys/values at the offset; return the layer's full buffers."""
        per_row = self.offset.ndim > 0
        if per_row:
            slots = mx.broadcast_to(self.positions(k.shape[2])[:, None, :, None], k.shape)
        for name, new in (("keys", k), ("values", v)):
            buffer = self.state[name][layer]
            new = new.astype(buffer.dtype)
            self.state[name][layer] = (mx.put_along_axis(buffer, slots, new, axis=2) if per_row
                                       else mx.slice_update(buffer, new, self.offset[None], axes=(2,)))
        return self.state["keys"][layer], self.state["values"][layer]

    def reset(self) -> None:
        """Start over (stale buffer contents are masked out by the offset)."""
        self.state["offset"] = mx.zeros_like(self.state["offset"])

    def advance(self, n) -> None:
        """Move the offset on by n (a number, or per row (B,))."""
        self.state["offset"] = self.state["offset"] + n


class Model(nn.Module):
    """`model(tokens, t)` -> logits (B, L, V); t (B,) is the mask ratio.

    With dropout > 0 it is active in training mode only (`model.train()`; `io.load` returns models in eval mode).
    AR models: `model(tokens, cache=KVCache(...))` continues from the cache's offset and advances it.
    attn_mask (L, L) or, with a cache, (L, cache size) boolean (True: attend) replaces the model's own mask;
    copies: tokens are that many copies of one window, each at the window's positions (see module docstring).
    features (B, feature_dim): a feature drafter's conditioning, its verifier's state (`ModelArgs.feature_dim`);
    hidden=True: (logits, the last hidden states (B, L, dim) the output head reads: a verifier's features);
    hidden=(i, j, ...): the outputs of those layers side by side (B, L, k * dim), the last layer's as the head
    reads it (`ModelArgs.feature_layers`).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.dim)
        if args.pos_emb == "learned":
            self.pos_emb = mx.random.normal((args.max_seq_len, args.dim)) * 0.02
        if args.time_cond:
            self.t_proj = nn.Linear(1, args.dim)
        if args.feature_dim:
            self.feature_proj = nn.Linear(args.feature_dim, args.dim)
        if args.draft_context and args.block_size > 1:  # starts at zero: at first the rows are independent
            self.draft_table = mx.zeros((args.block_size - 1, args.vocab_size ** args.draft_context, args.vocab_size))
        self.emb_drop = nn.Dropout(args.dropout)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        if args.final_norm:
            self.norm = _norm(args)
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=args.output_bias)

    def __call__(self, tokens: mx.array, t: mx.array | None = None, cache: KVCache | None = None,
                 attn_mask: mx.array | None = None, copies: int = 1, advance: int | None = None,
                 features: mx.array | None = None, hidden: bool | tuple[int, ...] = False
                 ) -> mx.array | tuple[mx.array, mx.array]:
        """advance: positions the cache's offset moves on by (default all L; block decoding writes a noisy
        block's keys without keeping them)."""
        args = self.args
        L = tokens.shape[1]
        x = self.tok_emb(tokens)
        if args.pos_emb == "learned":
            span = cache.positions(L // copies) if cache is not None else mx.arange(L // copies)
            x = x + mx.tile(mx.take(self.pos_emb, span, axis=0), (copies, 1) if span.ndim == 1 else (1, copies, 1))
        if "t_proj" in self:
            if t is None:
                raise ValueError("this diffusion model needs the mask ratio t (B,)")
            x = x + self.t_proj(t.astype(x.dtype).reshape(-1, 1, 1))
        if "feature_proj" in self:
            if features is None:
                raise ValueError("this drafter needs its verifier's features (B, feature_dim)")
            x = x + self.feature_proj(features.astype(x.dtype))[:, None]
        x = self.emb_drop(x)
        read = hidden if isinstance(hidden, tuple) else (args.n_layers - 1,)
        outputs = {}  # the layer outputs `hidden` reads
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, attn_mask, copies)
            if hidden and i in read:
                outputs[i] = x
        if cache is not None:
            cache.advance(L if advance is None else advance)
        if args.final_norm:
            x = self.norm(x)
        outputs[args.n_layers - 1] = x
        state = mx.concatenate([outputs[i] for i in read], axis=-1) if hidden else None
        logits = self.tok_emb.as_linear(x) if args.tie_embeddings else self.lm_head(x)
        if args.logit_shift and args.model_type != "block":  # predictions for position i sit at i-1: move them home
            logits = mx.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
        if args.subs_mask_id is not None:
            banned = mx.arange(logits.shape[-1]) == args.subs_mask_id
            logits = mx.where(banned, mx.array(-mx.inf, dtype=logits.dtype), logits)
        return (logits, state) if hidden else logits

    def chain_bias(self, row: int, before: list[mx.array]) -> mx.array:
        """A chained feature drafter's logit bias (..., V) for its block row `row` (1 .. B-1, 0-based; row 0 has
        none): the table's entry for the `draft_context` tokens before that row (arrays of ids (...), the latest
        last), read as the digits of a number in base V."""
        V = self.args.vocab_size
        index = before[0]
        for token in before[1:]:
            index = index * V + token
        index = index + (row - 1) * V ** len(before)  # past the blocks of the rows before
        table = self.draft_table.reshape(-1, V)  # one gather from the whole table: `draft_table[row - 1]` would
        return mx.take(table, index, axis=0)  # copy the row's block first (measured: 75 us against 3)

    def num_params(self) -> int:
        """Number of parameters (learned position table included)."""
        from mlx.utils import tree_flatten

        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 per weight multiply-add plus attention scores and values."""
        a = self.args
        n_mlp = 3 if a.mlp == "swiglu" else 2
        qkv_out = a.dim + 2 * a.kv_heads * a.head_dim
        weights = a.n_layers * (qkv_out + a.dim * int(a.attn_out_proj)) * a.dim
        weights += a.n_layers * n_mlp * a.dim * a.hidden_dim + a.dim * a.vocab_size + a.feature_dim * a.dim
        return 2.0 * weights + 4.0 * a.n_layers * seq_len * a.dim


INIT_SCHEMES = ("local", "simple_dlm")


SINUSOID_BASE = 1000.0  # sharper than the usual 10000 for 128-character windows (measured: docs/benchmarks.md)


def sinusoid_table(length: int, dim: int, base: float = SINUSOID_BASE) -> mx.array:
    """Sinusoidal position codes (length, dim), RMS 1: sin/cos pairs at geometric frequencies.

    Nearby rows are similar and row i+k is a fixed rotation of row i, so a learned table started
    here knows locality from step 0."""
    pos = mx.arange(length, dtype=mx.float32)[:, None]
    freqs = base ** (-mx.arange(0, dim // 2, dtype=mx.float32) / (dim // 2))
    angles = pos * freqs[None, :]
    table = mx.stack([mx.sin(angles), mx.cos(angles)], axis=-1).reshape(length, -1)
    if table.shape[1] < dim:  # odd width: one zero column
        table = mx.concatenate([table, mx.zeros((length, 1))], axis=1)
    return table * math.sqrt(2.0)


def _tie_query_key(model: Model) -> None:
    """Start every key projection equal to its query projection: scores q.k become a positive-definite
    similarity of the inputs, so similar inputs (neighbouring positions) attend to each other from step 0."""
    d = model.args.dim
    if model.args.kv_heads != model.args.n_heads:  # grouped keys cannot equal the queries
        return
    for layer in model.layers:
        qkv = layer.attn.qkv
        qkv.weight = mx.concatenate([qkv.weight[:d], qkv.weight[:d], qkv.weight[2 * d:]], axis=0)
        if "bias" in qkv:
            qkv.bias = mx.concatenate([qkv.bias[:d], qkv.bias[:d], qkv.bias[2 * d:]])


def initialise(model: Model, scheme: str) -> None:
    """Initialise the embedding tables (and attention) by scheme, in place; other layers keep MLX's defaults.

    "simple_dlm": its N(0, 1) token and position tables. "local" (init_model's default): every key projection
    starts as its query projection (without GQA); with a learned position table also unit-scale tables like simple_dlm's
    (Adam moves each weight by about the learning rate per step, so unit-scale tables keep their structure
    while the layers learn to read them), the position table starting as a sinusoid, so attention is local
    from step 0. A learned position table drawn at random must discover locality from scratch: that is the
    simple_dlm layout's unigram plateau. RoPE layouts keep MLX's token table."""
    if scheme not in INIT_SCHEMES:
        raise UserError(f"unknown init {scheme!r} (choose from {', '.join(INIT_SCHEMES)})")
    if model.args.pos_emb != "learned":
        if scheme == "local":
            _tie_query_key(model)
        return
    model.tok_emb.weight = mx.random.normal(model.tok_emb.weight.shape)
    shape = model.pos_emb.shape
    if scheme == "simple_dlm":
        model.pos_emb = mx.random.normal(shape)
        return
    model.pos_emb = sinusoid_table(*shape)
    _tie_query_key(model)


def decode_layout(model: nn.Module, column_major: bool = True) -> None:
    """Store every dense layer's weight column-major, in place: the same values in one copy.

    A layer computes x @ W.T; with W column-major that is BLAS's no-transpose product, which OpenBLAS runs about
    twice as fast for the few rows of a cached decode pass (a block, a verify pass) and alike for one row or many
    (docs/models.md, "Model directory"). For MLX's CPU backend; quantized layers keep their own layout. A training
    update writes the usual row-major layout back; column_major=False does so at once (what `benchmark layout`
    compares against)."""
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            weight = module.weight
            module.weight = mx.contiguous(weight.T).T if column_major else mx.contiguous(weight)
            mx.eval(module.weight)  # one layer at a time: the old copy is freed before the next is made


def init_model(args: ModelArgs, seed: int | None = None, init: str = "local") -> Model:
    """A model with freshly initialised weights (seeded when seed is given; see `initialise`)."""
    if seed is not None:
        mx.random.seed(seed)
    model = Model(args)
    initialise(model, init)
    mx.eval(model.parameters())
    return model



def quantize(model: Model, *, group_size: int, bits: int) -> dict:
    """Quantize, in place, every Linear/Embedding whose input width divides group_size (others stay float).

    Returns the config entry that lets `load` rebuild the same quantized model.
    """
    def eligible(_path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=eligible)
    return {"group_size": group_size, "bits": bits}


MEMO_MAX_ENTRIES = 128  # compiled functions and caches kept per model, least recently used dropped first
MEMO_MAX_BYTES = 1 << 30  # and at most this many bytes of cached keys/values (a KV cache per canvas shape)


def memoize_on_model(model: Model, key: tuple, build):
    """What build() returns (compiled decoding or scoring functions, their caches), built once per model and key
    and kept on the model for later calls. The compiled functions take the model's weights as inputs, so later
    weight updates are seen. The store is bounded (MEMO_MAX_ENTRIES, MEMO_MAX_BYTES of KV caches): the least
    recently used entries go first, so a server answering many shapes does not grow without end."""
    store = model.__dict__.setdefault(MEMO_ATTRIBUTE, OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key]
    store[key] = value = build()
    while len(store) > 1 and (len(store) > MEMO_MAX_ENTRIES or memo_bytes(model) > MEMO_MAX_BYTES):
        store.popitem(last=False)
    return value


def memo_bytes(model: Model) -> int:
    """Bytes of the KV caches a model's memo holds."""
    def size(value) -> int:
        if isinstance(value, KVCache):
            return sum(a.nbytes for name in ("keys", "values") for a in value.state[name])
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        return 0

    return sum(size(v) for v in model.__dict__.get(MEMO_ATTRIBUTE, {}).values())
