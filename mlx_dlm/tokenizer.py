"""Tokenizers: characters (simple_dlm ids, mask = 0) and SentencePiece (BPE/unigram).

Both expose encode/decode, mask_id, vocab_size, save(dir) and are loaded back
from a model directory with `load_tokenizer(dir, config)`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_write_bytes

MASK_TOKEN = "[MASK]"
CHAR_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _check_known(text: str, known_sorted: np.ndarray) -> np.ndarray:
    """Index of each character of text in known_sorted (sorted code points); error on the first unknown."""
    cps = _codepoints(text)
    idx = np.searchsorted(known_sorted, cps)
    idx_clipped = np.minimum(idx, len(known_sorted) - 1)
    unknown = known_sorted[idx_clipped] != cps
    if unknown.any():
        pos = int(np.argmax(unknown))
        ch = text[pos]
        raise UserError(
            f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the tokenizer's vocabulary"
        )
    return idx_clipped


class CharTokenizer:
    """simple_dlm's character vocabulary: id 0 is the mask, then sorted(set(text)) from 1."""

    kind = "char"
    mask_id = 0

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise UserError("character vocabulary must be distinct single characters")
        self.chars = sorted(chars)
        self._cps = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._itos = np.array([MASK_TOKEN] + self.chars, dtype=object)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Build the vocabulary from training text."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as an int32 numpy array (fast path for whole corpora)."""
        if not text:
            return np.zeros(0, dtype=np.int32)
        return (_check_known(text, self._cps) + 1).astype(np.int32)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; a character outside the vocabulary is a UserError naming it."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """Text of ids; the mask id decodes to "[MASK]"."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        return "".join(self._itos[ids])

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json into a model directory."""
        payload = {"type": "char", "mask_token": MASK_TOKEN, "mask_id": 0, "chars": "".join(self.chars)}
        atomic_write_bytes(Path(directory) / CHAR_FILE, json.dumps(payload, ensure_ascii=False).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CharTokenizer":
        path = Path(directory) / CHAR_FILE
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            return cls(list(payload["chars"]))
        except FileNotFoundError:
            raise UserError(f"{path} is missing") from None
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not a valid character tokenizer ({err})") from None


class SentencePieceTokenizer:
    """A SentencePiece model with a dedicated mask piece at id 0 (a control symbol text cannot produce)."""

    kind = "sp"
    mask_id = 0

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self.sp.id_to_piece(0) != MASK_TOKEN:
            raise UserError(f"SentencePiece model has no {MASK_TOKEN} piece at id 0")
        pieces = "".join(self.sp.id_to_piece(i) for i in range(self.vocab_size)
                         if not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_byte(i)))
        known = set(pieces.replace("\u2581", " ")) | {" "}
        self._cps = np.array(sorted(ord(c) for c in known), dtype=np.uint32)

    @classmethod
    def train(cls, text: str, vocab_size: int, model_type: str = "bpe") -> "SentencePieceTokenizer":
        """Train on text; newlines and runs of spaces are kept so decode(encode(x)) == x."""
        import sentencepiece as spm

        # Chunks, not lines, so that newlines stay inside the training sentences.
        chunks = [text[i:i + 4096] for i in range(0, len(text), 4096)]
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(chunks), model_writer=buf, vocab_size=vocab_size,
                model_type=model_type, character_coverage=1.0, pad_id=0, pad_piece=MASK_TOKEN,
                unk_id=1, bos_id=-1, eos_id=-1, user_defined_symbols=["\n"],
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                max_sentence_length=1 << 16, minloglevel=2, num_threads=os.cpu_count() or 1,
            )
        except RuntimeError as err:
            raise UserError(f"SentencePiece training failed: {str(err).strip().splitlines()[-1]}") from None
        return cls(buf.getvalue())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as an int32 numpy array."""
        if not text:
            return np.zeros(0, dtype=np.int32)
        _check_known(text, self._cps)
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        """Token ids of text; a character outside the vocabulary is a UserError naming it."""
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """Text of ids; mask ids decode to "[MASK]"."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        out, run = [], []
        for i in ids:  # control pieces decode to "", so spell the mask out between runs
            if i == self.mask_id:
                out.append(self.sp.decode(run) + MASK_TOKEN)
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.model into a model directory."""
        atomic_write_bytes(Path(directory) / SP_FILE, self.model_proto)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SentencePieceTokenizer":
        path = Path(directory) / SP_FILE
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            raise UserError(f"{path} is missing") from None
        except RuntimeError as err:
            raise UserError(f"{path} is not a valid SentencePiece model ({err})") from None


Tokenizer = CharTokenizer | SentencePieceTokenizer
TOKENIZERS = {"char": CharTokenizer, "sp": SentencePieceTokenizer}


def load_tokenizer(directory: str | os.PathLike, kind: str) -> Tokenizer:
    """Load the tokenizer of kind ("char" or "sp") saved in a model directory."""
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer kind {kind!r} in config.json (expected char or sp)")
    return TOKENIZERS[kind].load(directory)
