import hashlib

import numpy as np
import pytest

from mlx_dlm import data
from mlx_dlm.errors import UserError


def test_read_corpus_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert data.read_corpus(tmp_path) == "first\nsecond"
    assert data.read_corpus(tmp_path / "a.txt") == "first"


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_bytes(b"ok \xff\xfe bad"), r"not UTF-8 text \(bad byte at offset 3\)"),
])
def test_read_corpus_errors(tmp_path, setup, message):
    path = tmp_path / "corpus.txt"
    setup(path)
    with pytest.raises(UserError, match=message):
        data.read_corpus(path)


def test_empty_folder_error(tmp_path):
    with pytest.raises(UserError, match="holds no .txt files"):
        data.read_corpus(tmp_path)


def test_packaged_corpus_is_tiny_shakespeare_and_needs_no_cache(tmp_path, monkeypatch, shakespeare):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "empty"))  # no cache, and URLs refused by the fixture
    assert data.read_corpus(None) == shakespeare
    assert not (tmp_path / "empty").exists()


def test_packaged_corpus_is_checked(tmp_path, monkeypatch, shakespeare_path):
    import gzip

    monkeypatch.setattr(data, "ASSETS_DIR", tmp_path)
    (tmp_path / data.PACKAGED_CORPUS).write_bytes(gzip.compress(shakespeare_path.read_bytes()[:-1]))
    with pytest.raises(UserError, match="packaged corpus .* fails its sha256 check"):
        data.read_corpus(None)


def test_cache_lookup_and_verification(tmp_path, monkeypatch, shakespeare_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(data, "ASSETS_DIR", tmp_path / "no-assets")  # an installation without the packaged copy
    assert hashlib.sha256(shakespeare_path.read_bytes()).hexdigest() == data.TINY_SHAKESPEARE_SHA256
    # Missing and offline (the test fixture refuses all URLs): a one-line error that names --data.
    with pytest.raises(UserError, match="cannot download Tiny Shakespeare.*pass --data"):
        data.read_corpus(None)
    cached = tmp_path / data.TINY_SHAKESPEARE_FILE
    cached.write_bytes(shakespeare_path.read_bytes())
    assert len(data.read_corpus(None)) == 1_115_394
    cached.write_bytes(shakespeare_path.read_bytes()[:-10])
    with pytest.raises(UserError, match="fails its sha256 check"):
        data.read_corpus(None)


def test_download_is_verified_and_written_atomically(tmp_path, monkeypatch, shakespeare_path):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))

    class Response:
        def __init__(self, payload):
            self.payload = payload

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return self.payload

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: Response(b"tampered"))
    with pytest.raises(UserError, match="fails its sha256 check"):
        data.tiny_shakespeare_path()
    assert not (tmp_path / data.TINY_SHAKESPEARE_FILE).exists()
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: Response(shakespeare_path.read_bytes()))
    assert data.tiny_shakespeare_path().read_bytes() == shakespeare_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.TINY_SHAKESPEARE_FILE]  # no temp left over


def test_split_and_windows():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = data.split_tokens(tokens, 0.1)
    assert len(train) == 900 and val[0] == 900 and val[-1] == 999
    rng = np.random.default_rng(0)
    batch = data.random_windows(train, 16, 32, rng)
    assert batch.shape == (16, 32) and batch.dtype == np.int32
    assert (np.diff(batch, axis=1) == 1).all()  # each row is a contiguous slice of the corpus
    assert batch.min() >= 0 and batch.max() < 900
    starts = data.random_windows(train, 4000, 32, rng)[:, 0]
    assert starts.max() == 900 - 32 and starts.min() == 0  # every offset reachable, none out of range
    np.testing.assert_array_equal(data.eval_windows(val, 3, 8), data.eval_windows(val, 3, 8))


def test_window_longer_than_data():
    with pytest.raises(UserError, match="fewer than one window of --seq-len 64"):
        data.check_window(np.arange(10), 64, "training")
    with pytest.raises(UserError, match="--val-fraction"):
        data.split_tokens(np.arange(10), 1.0)
