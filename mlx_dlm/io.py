"""The model directory: config.json, model.safetensors and tokenizer files, and an optional sampling.json (the
model's own decoding defaults: SamplerOptions fields, `options.MODEL_FIELDS`; `load` keeps them on the model).

Trained, converted and downloaded models share this format. Every file is
written atomically (temp file in the same folder, then os.replace).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import UserError
from .fileio import atomic_write, atomic_write_text
from .hub import resolve
from .model import Model, ModelArgs, decode_layout, quantize
from .options import DEFAULTS_ATTRIBUTE, MODEL_FIELDS, SamplerOptions
from .tokenizer import Tokenizer, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAMPLING_FILE = "sampling.json"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# reference models trained here, in ASSETS_DIR: the diffusion model, its matched AR, the independent judge and the
# AR adapted to block diffusion (blocks of 4 and 2)
SHIPPED_MODELS = ("shakespeare-dlm", "shakespeare-ar", "shakespeare-judge", "shakespeare-block", "shakespeare-block2",
                  "shakespeare-ar-drafter")


def save_weights(path: str | os.PathLike, model: Model, metadata: dict[str, str] | None = None) -> None:
    """Write a model's parameters (and string metadata) to a safetensors file, atomically."""
    weights = dict(tree_flatten(model.parameters()))
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, weights, metadata=metadata or {}))


def save_model(directory: str | os.PathLike, model: Model, tokenizer: Tokenizer, extra: dict | None = None,
               metadata: dict[str, str] | None = None) -> None:
    """Write a complete model directory (tokenizer, weights, then config.json last).

    extra: more config.json entries; metadata: strings stored in model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory)
    save_weights(directory / WEIGHTS_FILE, model, metadata)
    config = {**model.args.to_dict(), "tokenizer": tokenizer.kind, "mask_id": tokenizer.mask_id, **(extra or {})}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def read_config(directory: str | os.PathLike) -> dict:
    """config.json of a model directory, with one-line errors for missing or broken files."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {directory} is not a model directory") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return config


def read_sampling_defaults(directory: str | os.PathLike) -> dict:
    """The model's own decoding defaults from its sampling.json ({} without one), checked: one-line errors for a
    broken file, an option a model may not set, or a value out of range."""
    path = Path(directory) / SAMPLING_FILE
    if not path.exists():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} does not hold a JSON object")
    unknown = sorted(set(values) - set(MODEL_FIELDS))
    if unknown:
        raise UserError(f"{path}: {unknown[0]!r} is not an option a model sets (those are: {', '.join(MODEL_FIELDS)})")
    try:
        SamplerOptions(**values).check()
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return values


def write_sampling_defaults(directory: str | os.PathLike, values: dict) -> None:
    """Write a model directory's sampling.json (atomically), unless it has one: what is there may be the user's."""
    path = Path(directory) / SAMPLING_FILE
    if not path.exists():
        SamplerOptions(**values).check()
        atomic_write_text(path, json.dumps(values, indent=2) + "\n")


def load_weights(model: Model, path: str | os.PathLike) -> None:
    """Load safetensors weights into model, strictly (every parameter, matching shapes)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing")
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise UserError(f"{path} does not match config.json: {str(err).splitlines()[0]}") from None
    mx.eval(model.parameters())


def shipped_model(name: str | os.PathLike) -> Path | None:
    """The directory of a reference model shipped in the package (SHIPPED_MODELS), or None for other names.

    A local directory of the same name takes precedence."""
    if str(name) not in SHIPPED_MODELS or Path(name).is_dir():
        return None
    directory = ASSETS_DIR / str(name)
    if not (directory / CONFIG_FILE).exists():
        raise UserError(f"the reference model {name} is not in this installation of mlx-dlm ({directory} is missing)")
    return directory


def _compute_form_for(model: Model, keep_dtype: bool) -> None:
    """On MLX's CPU backend compute half-precision weights in float32 unless keep_dtype: its float16 matmuls are
    ~14x slower; and lay dense weights out for decoding (`model.decode_layout`). Both are documented in
    docs/models.md, "Model directory". Stored files keep their dtype; quantized weights stay quantized."""
    if mx.default_device() != mx.cpu:
        return
    halves = any(v.dtype in (mx.float16, mx.bfloat16) for _, v in tree_flatten(model.parameters()))
    if halves and not keep_dtype:
        model.set_dtype(mx.float32)
    decode_layout(model)
    mx.eval(model.parameters())  # now: MLX streams are per thread, and a server evaluates in its own threads


def load(path: str | os.PathLike, revision: str | None = None, keep_dtype: bool = False) -> tuple[Model, Tokenizer]:
    """Load (model, tokenizer) from a model directory, a shipped model's name (SHIPPED_MODELS) or a
    Hugging Face repo id ("user/repo"). On the CPU backend float16/bfloat16 weights are computed in float32
    unless keep_dtype."""
    directory = shipped_model(path) or resolve(path, revision)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a model directory")
    if not directory.is_dir():
        raise UserError(f"model directory {directory} does not exist")
    config = read_config(directory)
    defaults = read_sampling_defaults(directory)
    try:
        args = ModelArgs.from_dict(config)
    except TypeError as err:
        raise UserError(f"{directory / CONFIG_FILE} is not a valid model config ({err})") from None
    if args.model_type == "block" and defaults.get("block_length", args.block_size) not in (0, args.block_size):
        raise UserError(f"{directory / SAMPLING_FILE}: block_length {defaults['block_length']}, but this block model "
                        f"decodes in its own blocks of {args.block_size}")
    tokenizer = load_tokenizer(directory, config.get("tokenizer", "char"))
    # A Hugging Face model's embedding table may have padding rows beyond its tokenizer's ids.
    mismatch = tokenizer.vocab_size > args.vocab_size if tokenizer.kind == "hf" else tokenizer.vocab_size != args.vocab_size
    if mismatch:
        raise UserError(f"tokenizer in {directory} has {tokenizer.vocab_size} tokens but config.json "
                        f"says vocab_size {args.vocab_size}")
    model = Model(args)
    if config.get("quantization"):
        q = config["quantization"]
        quantize(model, group_size=int(q["group_size"]), bits=int(q["bits"]))
    load_weights(model, directory / WEIGHTS_FILE)
    _compute_form_for(model, keep_dtype)
    model.eval()
    vars(model)[DEFAULTS_ATTRIBUTE] = defaults
    return model, tokenizer


def write_model_card(directory: str | os.PathLike, args: ModelArgs, n_params: int, tokenizer: Tokenizer,
                     source_lines: list[str], name: str | None = None) -> None:
    """A short README.md: what the model is, where it came from, how to sample it.

    name: what the model is called (default: the directory's name)."""
    a = args
    name = name or Path(directory).name
    kind = {"dlm": "a masked diffusion LM", "ar": "an autoregressive LM",
            "block": f"a block-diffusion LM (blocks of {a.block_size}, an exact KV cache)"}[a.model_type]
    lines = [
        "---", "library_name: mlx", "tags: [mlx, mlx-dlm" + (", diffusion-language-model" if a.model_type != "ar"
                                                               else "") + "]", "---", "",
        f"# {name}", "",
        f"{kind[0].upper()}{kind[1:]} for mlx-dlm ([MLX](https://github.com/ml-explore/mlx)): {a.n_layers} layers, width {a.dim}, "
        f"{a.n_heads} head(s), context {a.max_seq_len}, {n_params / 1e6:.2f}M parameters, "
        f"{tokenizer.kind} tokenizer with {tokenizer.vocab_size} tokens.", "",
        *source_lines, "",
        "```bash", f"mlx_dlm.generate --model {name} --prompt \"ROMEO:\" --max-tokens 64", "```", "",
    ]
    atomic_write_text(Path(directory) / "README.md", "\n".join(lines))
