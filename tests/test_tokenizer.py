import numpy as np
import pytest

from mlx_dlm.errors import UserError
from mlx_dlm.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer


def test_char_ids_match_simple_dlm(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    expected = {c: i + 1 for i, c in enumerate(sorted(set(shakespeare)))}  # simple_dlm: [MASK] = 0
    assert tok.vocab_size == 66 and tok.mask_id == 0
    sample = shakespeare[5000:7000]
    assert tok.encode(sample) == [expected[c] for c in sample]
    assert tok.decode(tok.encode(shakespeare)) == shakespeare
    assert tok.decode([0, expected["a"]]) == "[MASK]a"


def test_char_unknown_character_error():
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(UserError, match=r"'Z' \(U\+005A\) at position 6"):
        tok.encode("hello Zorld")
    assert tok.encode("") == []


def test_char_save_load(tmp_path, shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path, "char")
    assert back.chars == tok.chars and back.encode("ROMEO:\n") == tok.encode("ROMEO:\n")


def test_char_load_errors(tmp_path):
    with pytest.raises(UserError, match="tokenizer.json is missing"):
        CharTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid character tokenizer"):
        CharTokenizer.load(tmp_path)
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path, "bytes")


@pytest.fixture(scope="module")
def sp_tok(shakespeare):
    return SentencePieceTokenizer.train(shakespeare[:200_000], vocab_size=300)


def test_sp_round_trip_keeps_whitespace(sp_tok, shakespeare):
    text = shakespeare[300_000:302_000] + "\n\n  two  spaces   and three\n"
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    assert len(ids) < len(text)  # merges happened
    assert sp_tok.vocab_size == 300 and sp_tok.mask_id == 0


def test_sp_mask_is_never_produced_by_text(sp_tok):
    ids = np.array(sp_tok.encode("MASK is plain text, here!"))
    assert (ids != sp_tok.mask_id).all()
    assert sp_tok.decode([sp_tok.mask_id]) == "[MASK]"


def test_sp_unknown_character_error(sp_tok):
    with pytest.raises(UserError, match=r"'€' \(U\+20AC\) at position 4"):
        sp_tok.encode("cost€")


def test_sp_save_load(tmp_path, sp_tok):
    sp_tok.save(tmp_path)
    back = load_tokenizer(tmp_path, "sp")
    text = "KING RICHARD III:\nWhat say you?"
    assert back.encode(text) == sp_tok.encode(text)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path, "sp")
