"""Shared fixtures: real text from the corpus shipped in the package, tiny trained models, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mlx_dlm  # noqa: F401  (BLAS switch before mlx.core)

CONVERT_MODULES = ("torch_files", "hf", "nanogpt", "simple_dlm", "__main__")


def _alias_mutated_convert() -> None:
    """Under mutmut, make `mlx_dlm.convert` the mutated copy of convert/.

    The package installs convert/ as `mlx_dlm.convert` (pyproject package-dir), so a test importing
    `mlx_dlm.convert` gets the original files, while mutmut names the mutants of convert/ `convert.*` and
    switches a mutant on only where the function's module has that name. Importing the copy in mutants/
    as `convert` and registering it under `mlx_dlm.convert` too lets the tests reach the mutants."""
    import importlib
    import sys

    copy_root = Path(__file__).resolve().parents[1]
    if not (copy_root / "convert" / "__init__.py").exists():
        return
    sys.path.insert(0, str(copy_root))
    package = importlib.import_module("convert")
    sys.modules["mlx_dlm.convert"] = package
    mlx_dlm.convert = package
    for name in CONVERT_MODULES:
        sys.modules[f"mlx_dlm.convert.{name}"] = importlib.import_module(f"convert.{name}")


if os.environ.get("MUTANT_UNDER_TEST"):
    _alias_mutated_convert()


@pytest.fixture(autouse=True)
def _sampler_built_afresh_while_mutmut_maps_tests():
    """While mutmut records which tests reach which function (its "stats" run), each test starts with no compiled
    sampler steps kept on the models it shares with other tests (`model.memoize_on_model`), so that every test reaching a
    sampler step builds it and is recorded as reaching it. Otherwise only the first test of a configuration
    counted: a remasking test reused the step a plain test had built, and mutmut never ran it on its mutants."""
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        import gc

        from mlx_dlm.model import MEMO_ATTRIBUTE, Model

        for obj in gc.get_objects():
            if isinstance(obj, Model):
                obj.__dict__.pop(MEMO_ATTRIBUTE, None)
    yield


TRAINING_SECONDS = 1.5  # building tiny_model_dir or tiny_ar_dir on a 2-core VM (pytest --durations: setup)


def pytest_collection_modifyitems(config, items):
    """Under mutmut, while a mutant is tested, run its tests cheapest first: mutmut's recorded duration of the test,
    plus the training of a tiny model for each such fixture it needs (mutmut's durations leave setup out).

    mutmut stops at a mutant's first failing test (-x), so a kill then costs the cheapest test that sees it."""
    import json

    if os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "fail"):
        return
    stats = Path(__file__).resolve().parents[1] / "mutmut-stats.json"
    if not stats.exists():
        return
    seconds = json.loads(stats.read_text()).get("duration_by_test", {})

    def cost(item) -> float:
        return seconds.get(item.nodeid, float("inf")) + sum(
            TRAINING_SECONDS for name in ("tiny_model_dir", "tiny_ar_dir") if name in item.fixturenames)

    items.sort(key=cost)


def needs(module: str, extra: str):
    """The module, or a skip saying which extra of pyproject.toml installs it (tests run with only `.[cpu,test]`)."""
    return pytest.importorskip(module, reason=f"{module} is not installed: the `{extra}` extra runs these tests "
                                              f"(pip install -e \".[{extra}]\")")


def learning_rates(optimizer, updates: int) -> list[float]:
    """The learning rate an optimizer applies at each of its first `updates` updates (of a zero gradient)."""
    import mlx.core as mx

    params = {"w": mx.zeros(2)}
    optimizer.init(params)
    rates = []
    for _ in range(updates):
        params = optimizer.apply_gradients({"w": mx.zeros(2)}, params)
        rates.append(optimizer.learning_rate.item())
    return rates


def metrics_rows(out: Path) -> list[dict]:
    """The rows of a model directory's metrics.jsonl."""
    import json

    from mlx_dlm.checkpoint import METRICS_FILE

    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def cli_error(capsys, main, argv) -> str:
    """The message (without "error: ") of a command that must refuse argv in one line with exit code 1."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.removeprefix("error: ")


def user_error(call, *args, **kwargs) -> str:
    """The message of the UserError that call(*args, **kwargs) must raise."""
    from mlx_dlm.errors import UserError

    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    return str(err.value)


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """Tiny Shakespeare as users' training gets it with no --data: the copy shipped in the package, sha256-checked."""
    from mlx_dlm.data import read_corpus

    return read_corpus(None)


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory, shakespeare) -> Path:
    """The packaged Tiny Shakespeare written out as a plain text file (for tests that need a --data path)."""
    path = tmp_path_factory.mktemp("corpus") / "tinyshakespeare.txt"
    path.write_bytes(shakespeare.encode("utf-8"))  # byte for byte (sha256-checked by test_data)
    return path


@pytest.fixture(scope="session")
def small_text_path(tmp_path_factory, shakespeare) -> Path:
    """The first 60k characters of Tiny Shakespeare (all 65 characters do not occur in it: that is fine)."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(shakespeare[:60_000], encoding="utf-8")
    return path


def untrained(text: str, max_seq_len: int, model_type: str = "dlm", extra_ids: int = 0, seed: int = 4):
    """(model, tokenizer): a tiny untrained model over the characters of text, its head wider than the tokenizer by
    extra_ids (as converted checkpoints can have). Its predictions depend on every position, where a briefly
    trained tiny model barely looks around, so tests of what a sampler conditions on can tell the difference."""
    from mlx_dlm.model import init_model, preset_args
    from mlx_dlm.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(text)
    return init_model(preset_args("simple_dlm", vocab_size=tok.vocab_size + extra_ids, dim=32, n_layers=2,
                                  hidden_dim=64, max_seq_len=max_seq_len, model_type=model_type, output_bias=True),
                      seed=seed), tok


TINY_TRAIN = ["--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--report-every", "10",
              "--eval-batches", "2", "--sample-tokens", "0", "--seed", "0"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, small_text_path) -> Path:
    """A tiny diffusion model trained for 40 steps (enough for sampler tests, not for good text)."""
    from mlx_dlm import train

    out = tmp_path_factory.mktemp("models") / "tiny"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "40", "--eval-every", "20",
                *TINY_TRAIN])
    return out


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a URL in a test fails loudly, except on this machine's loopback (a test server)."""
    import urllib.request

    real = urllib.request.urlopen

    def refuse(url, *args, **kwargs):
        target = url if isinstance(url, str) else url.full_url
        if target.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
            return real(url, *args, **kwargs)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory, small_text_path) -> Path:
    """The matched autoregressive baseline: same preset and data, causal, 40 steps."""
    from mlx_dlm import train

    out = tmp_path_factory.mktemp("models") / "tiny_ar"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "40", "--eval-every", "20",
                "--objective", "ar", *TINY_TRAIN])
    return out
