"""The benchmark harness: rows, fields, quality columns, plot, training speed (no timing asserted)."""

import importlib
import json

import pytest

bench = importlib.import_module("mlx_dlm.benchmark.__main__")


def test_random_pair_sweep(tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(["--preset", "tiny", "--trials", "1", "--steps", "4,8", "--batch-size", "1,2", "--max-tokens", "16",
                "--thresholds", "0.5", "--block-lengths", "8", "--remask", "0.2", "--variant-steps", "4",
                "--out", str(out)])
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert {k: results["machine"][k] is not None for k in ("platform", "cores", "mlx", "backend", "blas")} == \
        dict.fromkeys(("platform", "cores", "mlx", "backend", "blas"), True)
    assert results["machine"]["matmul_gflops"] > 0
    ar = [r for r in rows if r["model"] == "ar"]
    dlm = [r for r in rows if r["model"] == "dlm"]
    assert sorted(r["batch_size"] for r in ar) == [1, 2]
    sweep = [r for r in dlm if r["variant"] == "-"]
    assert len(sweep) == 2 * 2 * 2  # batch sizes x strategies x steps
    assert sorted(r["variant"] for r in dlm if r["batch_size"] == 1 and r["variant"] != "-") == \
        ["blk8", "blk8+cache", "remask0.2", "thr0.5"]
    cached = {r["variant"]: r for r in dlm if r["batch_size"] == 2 and r["variant"].startswith("blk")}
    assert cached["blk8+cache"]["forward_tokens"] < cached["blk8"]["forward_tokens"]
    for r in dlm:
        assert r["nfe"] == r["steps"] and r["tokens_per_forward"] == 16 / r["steps"]
        assert 0 < r["roofline_fraction"] and r["tokens_per_sec_min"] <= r["tokens_per_sec"] <= r["tokens_per_sec_max"]
        assert "gen_ppl" not in r  # random weights: speed only
    for r in ar:
        assert r["nfe"] == 16 and r["tokens_per_forward"] == 1 and r["ms_per_token"] > 0 and r["prompt_ms"] > 0
    assert "tok/s" in capsys.readouterr().out


def test_trained_pair_fills_quality(tmp_path, tiny_model_dir, tiny_ar_dir, small_text_path):
    out = tmp_path / "r.json"
    bench.main(["--dlm", str(tiny_model_dir), "--ar", str(tiny_ar_dir), "--data", str(small_text_path),
                "--trials", "1", "--steps", "8", "--strategies", "confidence", "--batch-size", "2",
                "--max-tokens", "24", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["quality"]["dlm_val_elbo"] > 0 and results["quality"]["ar_val_nll"] > 0
    for r in results["rows"]:
        assert 1 < r["gen_ppl"] < 100 and 0 < r["entropy_bits"] < 7


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    bench.main(["--preset", "tiny", "--trials", "1", "--steps", "2,4", "--strategies", "random", "--batch-size", "1",
                "--max-tokens", "8", "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_speed(tmp_path, capsys):
    out = tmp_path / "t.json"
    bench.main(["train", "--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--steps", "2", "--trials", "1",
                "--warmup", "1", "--out", str(out)])
    r = json.loads(out.read_text())["train"]
    assert r["steps_per_sec"] > 0 and r["tokens_per_sec"] == pytest.approx(r["steps_per_sec"] * 4 * 32)
    assert "steps/s" in capsys.readouterr().out


def test_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--dlm", "x"])
    assert exc.value.code == 1 and "pass --dlm DIR and --ar DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.main(["--preset", "tiny", "--strategies", "fastest"])
    assert exc.value.code == 2


def test_train_speed_side_by_side_with_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "t.json"
    bench.main(["train", "--preset", "simple_dlm", "--batch-size", "2", "--seq-len", "16", "--steps", "1",
                "--trials", "1", "--warmup", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["torch"]["steps_per_sec"] > 0
    assert r["torch"]["mlx_over_torch"] == pytest.approx(r["train"]["steps_per_sec"] / r["torch"]["steps_per_sec"])


def test_profile_rows_add_up(tmp_path):
    out = tmp_path / "p.json"
    bench.main(["profile", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
                "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["step_s"] > 0 and r["forward_s"] > 0
    assert r["explained_s"] == pytest.approx(sum(row["forward_backward_s"] * row["count"] for row in r["rows"]))
    counts = {row["op"].split(" (")[0]: row["count"] for row in r["rows"]}
    assert counts["softmax"] == 2 and counts["rmsnorm"] == 2 * 2 + 1  # per layer (2 layers), plus the final norm
