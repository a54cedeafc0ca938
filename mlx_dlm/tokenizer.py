"""Tokenizers: characters (simple_dlm ids, mask = 0), SentencePiece (BPE/unigram), and Hugging Face
`tokenizer.json` with chat templates (converted LLaDA and Dream models; extra `hf`).

All expose encode/decode, mask_id, vocab_size, save(dir) and are loaded back
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


HF_FILES = ("tokenizer.json", "tokenizer_config.json")
HF_SPECIAL = "special_tokens.json"  # our record of the mask, stop and bos ids of a converted HF tokenizer
MASK_NAMES = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")  # LLaDA, Dream, BERT-style, RoBERTa-style


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string, or a dict with its content."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` library, extra `hf`) with its chat template.

    Keeps the special tokens, and the mask, bos and stop (eos/eot) ids of the model it came with."""

    kind = "hf"

    def __init__(self, directory: str | os.PathLike, mask_id: int, stop_ids: list[int], bos_id: int | None = None):
        try:
            from tokenizers import Tokenizer as _Backend
        except ImportError:
            raise UserError("this model's tokenizer needs the hf extra: pip install 'mlx-dlm[hf]'") from None
        directory = Path(directory)
        try:
            self.backend = _Backend.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # the library raises its own exception type for unreadable files
            raise UserError(f"{directory / 'tokenizer.json'} is not a readable Hugging Face tokenizer ({err})") from None
        path = directory / "tokenizer_config.json"
        self.config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        self.directory, self.mask_id, self.stop_ids, self.bos_id = directory, int(mask_id), list(stop_ids), bos_id

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike, config: dict) -> "HFTokenizer":
        """The tokenizer of a Hugging Face model folder; mask and stop ids from config.json (then the vocabulary)."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise UserError(f"{folder} has no tokenizer.json")
        probe = cls(folder, mask_id=-1, stop_ids=[])
        vocab = probe.backend.get_vocab(with_added_tokens=True)
        mask_id = config.get("mask_token_id")
        if mask_id is None:
            mask_id = next((vocab[name] for name in MASK_NAMES if name in vocab), None)
        if mask_id is None:
            raise UserError(f"the tokenizer in {folder} has no mask token (config.json mask_token_id, or one of "
                            f"{', '.join(MASK_NAMES)})")
        stops = config.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        for name in (_token_text(probe.config.get("eos_token")), "<|eot_id|>", "<|endoftext|>", "<|im_end|>"):
            if name in vocab and vocab[name] not in stops:
                stops.append(vocab[name])
        bos = _token_text(probe.config.get("bos_token"))
        return cls(folder, int(mask_id), stops, vocab.get(bos) if bos else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The default chat template of tokenizer_config.json (a string, or the one named "default")."""
        template = self.config.get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> "ChatText":
        """Render messages as transformers does: jinja2's sandbox, trim_blocks and lstrip_blocks, the special
        tokens as variables, and raise_exception for templates that check their input. The messages' contents
        are marked in the result (`ChatText`), so that special-token strings a user writes encode as text."""
        if not self.chat_template:
            raise UserError(f"the model {self.directory.name!r} has no chat template (tokenizer_config.json); "
                            "use --prompt instead of --chat")
        rendered = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                        **{k: _token_text(v) for k, v in self.config.items()
                                           if k.endswith("_token") and _token_text(v) is not None})
        return ChatText(rendered, _content_spans(rendered, messages))

    def _encode(self, text: str, special: bool) -> list[int]:
        self.backend.encode_special_tokens = not special  # True: "<|im_start|>" in the text is plain text
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids. Special tokens written in the text, such as a chat template's, are recognised, except inside
        the message contents a `ChatText` marks: there they are text, as a user typed them."""
        ids, pos = [], 0
        for start, end in getattr(text, "content_spans", ()):
            ids += self._encode(text[pos:start], True) + self._encode(text[start:end], False)
            pos = end
        return np.asarray(ids + self._encode(text[pos:], True), dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        """Text of ids, special tokens included (the mask decodes to its own token text)."""
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        """Copy tokenizer.json and tokenizer_config.json, and record the special ids."""
        for name in HF_FILES:
            if (self.directory / name).exists() and Path(directory).resolve() != self.directory.resolve():
                atomic_write_bytes(Path(directory) / name, (self.directory / name).read_bytes())
        special = {"mask_id": self.mask_id, "stop_ids": self.stop_ids, "bos_id": self.bos_id}
        atomic_write_bytes(Path(directory) / HF_SPECIAL, json.dumps(special, indent=2).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        path = Path(directory) / HF_SPECIAL
        try:
            special = json.loads(path.read_text(encoding="utf-8"))
            return cls(directory, special["mask_id"], special.get("stop_ids", []), special.get("bos_id"))
        except FileNotFoundError:
            raise UserError(f"{path} is missing") from None
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path} is not valid ({err})") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **tokens) -> str:
    """A chat template rendered like transformers' apply_chat_template (needs jinja2, extra `hf`)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("chat templates need jinja2: pip install 'mlx-dlm[hf]'") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **tokens)
    except TemplateError as err:
        raise UserError(f"the chat template refused these messages: {err}") from None


class ChatText(str):
    """A rendered chat prompt that remembers where the messages' contents are (content_spans: (start, end) pairs)."""

    def __new__(cls, text: str, content_spans: list[tuple[int, int]]):
        self = super().__new__(cls, text)
        self.content_spans = content_spans
        return self


def _content_spans(rendered: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Where each message's content (stripped, as templates often trim it) sits in the rendered text, in order;
    a content the template changed otherwise is not found and stays unmarked."""
    spans, pos = [], 0
    for message in messages:
        content = message.get("content")
        content = content.strip() if isinstance(content, str) else ""
        start = rendered.find(content, pos) if content else -1
        if start >= 0:
            spans.append((start, start + len(content)))
            pos = start + len(content)
    return spans


Tokenizer = CharTokenizer | SentencePieceTokenizer | HFTokenizer
TOKENIZERS = {"char": CharTokenizer, "sp": SentencePieceTokenizer, "hf": HFTokenizer}


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The model's chat template applied to messages, ready for the assistant's turn."""
    if not hasattr(tokenizer, "apply_chat_template"):
        raise UserError(f"--chat needs a model with a chat template (a converted instruct model); this model's "
                        f"tokenizer is {tokenizer.kind}: use --prompt")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def load_tokenizer(directory: str | os.PathLike, kind: str) -> Tokenizer:
    """Load the tokenizer of kind ("char", "sp" or "hf") saved in a model directory."""
    if kind not in TOKENIZERS:
        raise UserError(f"unknown tokenizer kind {kind!r} in config.json (expected char, sp or hf)")
    return TOKENIZERS[kind].load(directory)
