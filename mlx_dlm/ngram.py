"""A character n-gram language model with interpolated Kneser-Ney smoothing: a judge of another kind than the
neural ones, built in a second or two from a training text.

- `NGramModel.fit(text, order)`: counts of every k-gram (k = 1..order) as sorted int64 keys (each k-gram's
  characters in base V), so lookups are `np.searchsorted` over whole arrays, never a Python loop per character;
- `prob`/`log_probs`: P(c | the order - 1 characters before it), Chen and Goodman's interpolated Kneser-Ney:
  the highest order uses raw counts, lower orders continuation counts (how many distinct characters precede a
  k-gram), one absolute discount per order D = n1 / (n1 + 2 n2), and the lowest order interpolates with the
  uniform distribution over the alphabet (plus one slot for characters the training text never had);
- `completion_nll(texts, start)`: the judge interface `eval.py` scores samples with, nats per text.

Where fewer than order - 1 characters precede a position, the highest order that fits is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

DEFAULT_ORDER = 6


@dataclass
class _Order:
    """Counts of the k-grams of one order k, as sorted keys with aligned values."""

    grams: np.ndarray  # sorted k-gram keys
    counts: np.ndarray  # their counts (raw at the top order, continuation counts below)
    contexts: np.ndarray  # sorted (k-1)-gram keys that precede something
    context_totals: np.ndarray  # sum of counts over what follows each context
    context_types: np.ndarray  # distinct characters following each context (with a count > 0)
    discount: float


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query, 0 where the query is absent (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(queries.shape, dtype=values.dtype)
    idx = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[idx] == queries, values[idx], 0)


def _discount(counts: np.ndarray) -> float:
    """Ney's estimate n1 / (n1 + 2 n2) from how many k-grams were seen once and twice (0.5 if undefined)."""
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5


class NGramModel:
    """Interpolated Kneser-Ney over characters (see the module docstring)."""

    def __init__(self, chars: str, order: int, orders: list[_Order]):
        self.chars, self.order, self.orders = chars, order, orders
        self.base = len(chars) + 1  # the alphabet and one slot for unseen characters
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str, order: int = DEFAULT_ORDER) -> NGramModel:
        """Count a training text."""
        if order < 1:
            raise UserError(f"the n-gram order must be at least 1, got {order}")
        if len(text) < order:
            raise UserError(f"the n-gram judge needs at least {order} characters of training text")
        chars = "".join(sorted(set(text)))
        base = len(chars) + 1
        if base ** order >= 2**62:
            raise UserError(f"order {order} over {len(chars)} characters does not fit 64-bit keys")
        ids = _encode(text, {c: i for i, c in enumerate(chars)}, base)
        grams_of = [_grams(ids, k, base) for k in range(order + 1)]  # grams_of[k]: every k-gram, text order
        orders = []
        for k in range(1, order + 1):
            if k == order:  # raw counts
                grams, counts = np.unique(grams_of[k], return_counts=True)
            else:  # continuation counts: distinct characters before each k-gram = distinct (k+1)-grams ending in it
                grams, counts = np.unique(np.unique(grams_of[k + 1]) % base**k, return_counts=True)
            contexts_all = grams // base
            contexts, first = np.unique(contexts_all, return_index=True)
            totals = np.add.reduceat(counts, first)
            types = np.diff(np.append(first, len(grams)))
            orders.append(_Order(grams, counts, contexts, totals, types, _discount(counts)))
        return cls(chars, order, orders)

    def log_probs(self, text: str, start: int = 0) -> np.ndarray:
        """ln P(text[i] | text[:i]) for i = start .. len(text) - 1 (at most order - 1 characters of context)."""
        return self._log_probs(_encode(text, self._index, self.base)[None], start)[0]

    def _log_probs(self, ids: np.ndarray, start: int) -> np.ndarray:
        """log_probs of a batch of equally long id rows (N, L): (N, L - start)."""
        positions = np.arange(start, ids.shape[1])
        p = np.full((len(ids), len(positions)), 1.0 / self.base)
        gram = np.zeros(p.shape, dtype=np.int64)  # the k-gram ending at each position
        for k, o in enumerate(self.orders, start=1):
            fits = positions - k + 1 >= 0
            gram = gram + np.where(fits, ids[:, np.maximum(positions - k + 1, 0)], 0) * self.base ** (k - 1)
            context = gram // self.base
            total = _lookup(o.contexts, o.context_totals, context).astype(np.float64)
            types = _lookup(o.contexts, o.context_types, context)
            count = _lookup(o.grams, o.counts, gram).astype(np.float64)
            seen = fits & (total > 0)
            safe = np.where(seen, total, 1.0)
            p = np.where(seen, (np.maximum(count - o.discount, 0.0) + o.discount * types * p) / safe, p)
        return np.log(p)

    def prob(self, context: str, char: str) -> float:
        """P(char | context), the context cut to its last order - 1 characters."""
        context = context[-(self.order - 1):] if self.order > 1 else ""
        return float(np.exp(self.log_probs(context + char, start=len(context))[0]))

    def completion_nll(self, texts: list[str], start: int) -> np.ndarray:
        """Nats of each text's characters from `start` on, given the characters before them (texts of one length
        are scored together)."""
        out = np.zeros(len(texts))
        by_length: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            by_length.setdefault(len(text), []).append(i)
        for length, rows in by_length.items():
            if length > start:
                ids = np.stack([_encode(texts[i], self._index, self.base) for i in rows])
                out[rows] = -self._log_probs(ids, start).sum(axis=1)
        return out


def _encode(text: str, index: dict[str, int], base: int) -> np.ndarray:
    """Character ids; characters outside the alphabet get the extra slot base - 1."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet = np.frombuffer("".join(index).encode("utf-32-le"), dtype=np.uint32)
    pos = np.searchsorted(alphabet, codes)  # the alphabet is sorted by code point
    pos = np.minimum(pos, max(len(alphabet) - 1, 0))
    known = alphabet[pos] == codes if len(alphabet) else np.zeros(len(codes), dtype=bool)
    return np.where(known, pos, base - 1).astype(np.int64)


def _grams(ids: np.ndarray, k: int, base: int) -> np.ndarray:
    """Keys of every k-gram of ids, in text order (k = 0: none)."""
    if k == 0 or len(ids) < k:
        return np.zeros(0, dtype=np.int64)
    key = np.zeros(len(ids) - k + 1, dtype=np.int64)
    for j in range(k):  # k <= order: a loop over the n-gram's width, not over the text
        key = key * base + ids[j:len(ids) - k + 1 + j]
    return key
