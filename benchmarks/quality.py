"""Quality beside speed: generative perplexity under the AR model, sample entropy, validation loss."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlx_dlm import data
from mlx_dlm.errors import UserError
from mlx_dlm.train import make_evaluator


def generative_perplexity(ar_model, ar_tokenizer, texts: list[str], prompt: str) -> float:
    """Per-character perplexity of the completions (text after the prompt) scored by the AR model.

    exp(total NLL of the completion tokens given everything before them / number of completion characters).
    """
    total_nll, total_chars = 0.0, 0
    p = len(ar_tokenizer.encode(prompt))
    for text in texts:
        ids = ar_tokenizer.encode(text)
        if p == 0:  # score the first token from a newline, as the AR model samples from one
            ids, p_eff = ar_tokenizer.encode("\n") + ids, 1
        else:
            p_eff = p
        if len(ids) > ar_model.args.max_seq_len:
            raise UserError(f"a sample of {len(ids)} tokens is longer than the AR model's context")
        logits = ar_model(mx.array([ids[:-1]])).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -np.array(mx.take_along_axis(logp, mx.array([ids[1:]])[..., None], axis=-1))[0, :, 0]
        total_nll += float(nll[p_eff - 1:].sum())
        total_chars += len(text) - len(prompt)
    return math.exp(total_nll / max(total_chars, 1))


def char_entropy(texts: list[str], prompt: str) -> float:
    """Entropy (bits) of the character distribution of the completions: low values flag repetitive output."""
    chars = "".join(t[len(prompt):] for t in texts)
    _, counts = np.unique(np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def validation_loss(model, tokenizer, data_path: str | None, seq_len: int = 128, windows: int = 64,
                    batch_size: int = 16) -> float:
    """The model's validation loss (nats/token): ELBO for a DLM, NLL for AR, on the last 10% of the corpus."""
    tokens = tokenizer.encode_array(data.read_corpus(data_path))
    _, val = data.split_tokens(tokens)
    seq_len = min(seq_len, model.args.max_seq_len)
    data.check_window(val, seq_len, "validation")
    return make_evaluator(model, data.eval_windows(val, windows, seq_len), tokenizer.mask_id, batch_size)()
