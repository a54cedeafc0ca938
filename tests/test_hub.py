"""Hub: repo ids resolve through the Hugging Face cache offline; model cards; upload calls (no network)."""

import importlib
import shutil

import pytest

import mlx_dlm
from mlx_dlm import upload as upload_module
from mlx_dlm.errors import UserError

generate_cli = importlib.import_module("mlx_dlm.generate")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A Hub-format cache holding user/tiny at commit abc123 (as snapshot_download leaves it)."""
    snapshot = tmp_path / "hub" / "models--user--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(tiny_model_dir / name, snapshot / name)
    (tmp_path / "hub" / "models--user--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--user--tiny" / "refs" / "main").write_text("abc123")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read once at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return snapshot


def test_repo_id_loads_from_cache_offline(hub_cache, tiny_model_dir, capsys):
    model, tok = mlx_dlm.load("user/tiny")
    local, _ = mlx_dlm.load(tiny_model_dir)
    assert model.args == local.args and tok.chars == mlx_dlm.load(tiny_model_dir)[1].chars
    generate_cli.main(["--model", "user/tiny", "--prompt", "A", "--max-tokens", "8", "--steps", "2", "--seed", "0"])
    assert "Generation: 8 tokens" in capsys.readouterr().out


def test_unknown_repo_offline_is_a_clear_error(hub_cache, capsys):
    with pytest.raises(UserError, match="user/nothing is not a local directory and not in the Hugging Face cache"):
        mlx_dlm.load("user/nothing")
    with pytest.raises(SystemExit) as exc:
        generate_cli.main(["--model", "user/nothing"])
    assert exc.value.code == 1 and "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_upload_writes_card_and_uploads_model_files(tmp_path, tiny_model_dir, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    directory = tmp_path / "m"
    shutil.copytree(tiny_model_dir, directory)
    url = upload_module.upload(directory, "someone/tiny-dlm")
    assert url.endswith("someone/tiny-dlm")
    assert calls[0] == ("create", "someone/tiny-dlm", {"private": False, "exist_ok": True})
    upload = calls[1][1]
    assert upload["repo_id"] == "someone/tiny-dlm" and upload["folder_path"] == str(directory)
    assert "optimizer.safetensors" not in upload["allow_patterns"] and "model.safetensors" in upload["allow_patterns"]
    card = (directory / "README.md").read_text()
    for text in ("library_name: mlx", "tags: [mlx, mlx-dlm, diffusion-language-model]", "masked diffusion LM",
                 "for 40 steps", "Final validation loss", "mlx_dlm.generate --model someone/tiny-dlm"):
        assert text in card, text


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi replaced by a recorder: (method, args, kwargs) of every call."""
    calls = []

    class FakeApi:
        def __getattr__(self, name):
            return lambda *args, **kw: calls.append((name, args, kw))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls


def test_upload_cli_passes_private_and_revision(tmp_path, tiny_model_dir, fake_hub, capsys):
    directory = tmp_path / "m"
    shutil.copytree(tiny_model_dir, directory)
    upload_module.main(["--path", str(directory), "--repo", "someone/x", "--private", "--revision", "dev"])
    (create, args, create_kw), (upload, _, upload_kw) = fake_hub
    assert (create, args, create_kw) == ("create_repo", ("someone/x",), {"private": True, "exist_ok": True})
    assert upload == "upload_folder" and upload_kw["revision"] == "dev" and upload_kw["repo_id"] == "someone/x"
    assert "Uploaded" in capsys.readouterr().out


def test_train_upload_repo_uploads_the_finished_model(tmp_path, small_text_path, fake_hub):
    from mlx_dlm import train

    from conftest import TINY_TRAIN

    out = tmp_path / "run"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "2", "--eval-every", "2",
                "--upload-repo", "someone/run", *TINY_TRAIN])
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert fake_hub[1][2]["folder_path"] == str(out) and fake_hub[1][2]["repo_id"] == "someone/run"
    assert "someone/run" in (out / "README.md").read_text()


def test_offline_upload_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir):
    directory = tmp_path / "m"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "README.md").unlink(missing_ok=True)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(UserError, match="cannot create someone/tiny-dlm on the Hub"):
        upload_module.upload(directory, "someone/tiny-dlm")  # HF_HUB_OFFLINE=1 in tests
    assert sorted(p.name for p in directory.iterdir()) == before  # no model card written
