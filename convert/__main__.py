"""`mlx_dlm.convert SOURCE CHECKPOINT ...`: a checkpoint -> an mlx-dlm model directory.

    mlx_dlm.convert simple_dlm checkpoint.pt --text input.txt --out models/simple_dlm
    mlx_dlm.convert nanogpt ckpt.pt --meta meta.pkl --out models/nanogpt -q --q-bits 8
    mlx_dlm.convert hf GSAI-ML/LLaDA-8B-Instruct --out models/llada-8b-instruct-4bit -q --q-bits 4

PyTorch checkpoints (simple_dlm, nanoGPT) need torch; Hugging Face folders (LLaDA, Dream: hf.py) are read from
their safetensors shards by MLX and need the `hf` extra for their tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_dlm import data
from mlx_dlm.errors import UserError, run_cli
from mlx_dlm.fileio import ensure_dir
from mlx_dlm.io import CONFIG_FILE, WEIGHTS_FILE, save_model, write_model_card
from mlx_dlm.model import Model, quantize
from mlx_dlm.tokenizer import CharTokenizer, HFTokenizer

from . import hf, nanogpt, simple_dlm
from .torch_files import load_plain_pickle, load_torch, to_numpy

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


# The flags' help texts: wording, not behaviour, so kept out of mutation testing (the parser's names, choices,
# types and defaults stay in it).
# pragma: no mutate start
HELP = {
    "description": "Convert a PyTorch checkpoint for MLX.",
    "source": "what made the checkpoint (hf: a LLaDA or Dream model from Hugging Face)",
    "checkpoint": "the .pt file, or for hf a model folder or Hub repo id (user/name)",
    "out": "model directory to create",
    "text": "simple_dlm: the training text (its characters are the vocabulary)",
    "meta": "nanoGPT: the dataset's meta.pkl (stoi/itos)",
    "dtype": "dtype of the stored weights (default: float32; bfloat16 for hf)",
    "quantize": "quantize Linear and Embedding weights",
    "q_bits": "bits per quantized weight (with -q)",
    "q_group_size": "weights per quantization scale (with -q)",
    "force": "replace --out if it exists",
    "upload_repo": "then upload the model directory to this Hugging Face repo (user/name)",
}
# pragma: no mutate end


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.convert (help texts in HELP)."""
    p = argparse.ArgumentParser(prog="mlx_dlm.convert", description=HELP["description"],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", choices=("simple_dlm", "nanogpt", "hf"), help=HELP["source"])
    p.add_argument("checkpoint", help=HELP["checkpoint"])
    p.add_argument("--out", required=True, help=HELP["out"])
    p.add_argument("--text", help=HELP["text"])
    p.add_argument("--meta", help=HELP["meta"])
    p.add_argument("--dtype", choices=DTYPES, help=HELP["dtype"])
    p.add_argument("-q", "--quantize", action="store_true", help=HELP["quantize"])
    p.add_argument("--q-bits", type=int, choices=(4, 8), default=4, help=HELP["q_bits"])
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64, help=HELP["q_group_size"])
    p.add_argument("--force", action="store_true", help=HELP["force"])
    p.add_argument("--upload-repo", help=HELP["upload_repo"])
    return p


def _replace_dir(out: Path, build) -> None:
    """Build the directory under a temp name beside out, then swap it in (old one removed only after)."""
    ensure_dir(out.parent, "--out's parent")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_source(args: argparse.Namespace):
    """(ModelArgs, weights, tokenizer, a model-card line on the source, and for hf -q the quantized model the
    weights were made for; None otherwise)."""
    if args.source == "hf":
        folder = hf.resolve_source(args.checkpoint)
        config = hf.read_config(folder)
        kind = hf.family(config)
        tokenizer = HFTokenizer.from_hf_folder(folder, config)
        model_args = hf.model_args(config, kind)
        structure, finish = None, None
        if args.quantize:  # quantize each weight as it is read: the float model is never held whole
            structure = Model(model_args)
            quantize(structure, group_size=args.q_group_size, bits=args.q_bits)
            finish = hf.quantizer(structure, args.q_group_size, args.q_bits)
        weights = hf.read_weights(folder, kind, model_args, DTYPES[args.dtype], finish)
        return model_args, weights, tokenizer, (f"Converted from the {kind} Hugging Face model `{args.checkpoint}` "
                                                "with `mlx_dlm.convert hf`."), structure
    if args.source == "simple_dlm":
        if not args.text:
            raise UserError("simple_dlm checkpoints hold no vocabulary: pass --text TRAIN.txt (the training text)")
        tokenizer = CharTokenizer.from_text(data.read_corpus(args.text))
        obj = load_torch(args.checkpoint)
        model_args, weights = simple_dlm.convert(to_numpy(obj.get("model", obj)), tokenizer)
    else:
        if not args.meta:
            raise UserError("nanoGPT checkpoints hold no vocabulary: pass --meta META.pkl from the dataset folder")
        tokenizer, stoi = nanogpt.tokenizer_from_meta(load_plain_pickle(args.meta))
        model_args, weights = nanogpt.convert(load_torch(args.checkpoint), tokenizer, stoi, to_numpy)
    sha = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
    return model_args, weights, tokenizer, (f"Converted from a {args.source} PyTorch checkpoint "
                                            f"(`{Path(args.checkpoint).name}`, sha256 `{sha[:16]}…`) with "
                                            "`mlx_dlm.convert`."), None


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a model directory: choose another --out")
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists: choose another --out or pass --force to replace it")
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).exists():
        raise UserError(f"--force replaces only a model directory, and {out} holds no {CONFIG_FILE}: "
                        "choose another --out")
    args.dtype = args.dtype or ("bfloat16" if args.source == "hf" else "float32")
    model_args, weights, tokenizer, source, prequantized = _read_source(args)
    # Random initial weights stay lazy: they are replaced before anything evaluates them.
    n_params = Model(model_args).num_params()  # the float count, also for quantized models
    float_bytes = n_params * DTYPES[args.dtype].size
    extra = {"source": args.source, "dtype": args.dtype}
    model = prequantized or Model(model_args)
    if prequantized is not None:  # hf -q: quantized while read, into this model's structure
        extra["quantization"] = {"group_size": args.q_group_size, "bits": args.q_bits}
    try:
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    except ValueError as err:
        raise UserError(f"converted weights do not fit the model: {str(err).splitlines()[0]}") from None
    del weights
    if prequantized is None:
        model.set_dtype(DTYPES[args.dtype])
        if args.quantize:
            extra["quantization"] = quantize(model, group_size=args.q_group_size, bits=args.q_bits)
    mx.eval(model.parameters())

    def build(directory: Path) -> None:
        save_model(directory, model, tokenizer, extra)
        write_model_card(directory, model_args, n_params, tokenizer, source_lines=[
            source, f"Weights: {args.dtype}" + (f", quantized to {args.q_bits} bits (group size {args.q_group_size})"
                                                if args.quantize else "") + ".",
        ], name=out.name)

    _replace_dir(out, build)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(f"Converted {args.source} checkpoint {args.checkpoint} ({n_params / 1e6:.2f}M parameters, "
          f"{model_args.model_type}) -> {out}")
    print(f"model.safetensors: {size / 1e6:.2f} MB ({args.dtype} weights would be {float_bytes / 1e6:.2f} MB)")
    if args.upload_repo:
        from mlx_dlm.upload import upload

        print(f"Uploaded to {upload(out, args.upload_repo)}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
