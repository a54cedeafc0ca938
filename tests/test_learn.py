"""`mlx_dlm.benchmark learn`: curves from real (tiny) runs, the summary's arithmetic, the PyTorch loop's curve."""

import argparse
import importlib
import json
from collections import Counter

import numpy as np
import pytest

from conftest import needs

learn = importlib.import_module("mlx_dlm.benchmark.learn")
bench = importlib.import_module("mlx_dlm.benchmark.__main__")


def test_learn_runs_configs_and_writes_json_and_plot(tmp_path, small_text_path, capsys):
    out, png = tmp_path / "l.json", tmp_path / "l.png"
    argv = ["learn", "--data", str(small_text_path), "--steps", "6", "--eval-every", "3", "--eval-batches", "1",
            "--batch-size", "4", "--seq-len", "32", "--no-defaults", "--out", str(out),
            "--config", "tiny=--preset tiny", "--config", "tiny ar=--preset tiny --objective ar"]
    if importlib.util.find_spec("matplotlib"):
        argv += ["--plot", str(png)]
    bench.main(argv)
    r = json.loads(out.read_text())
    assert [c["name"] for c in r["configs"]] == ["tiny", "tiny ar"]
    assert [c["objective"] for c in r["configs"]] == ["dlm", "ar"]
    for c in r["configs"]:
        assert [p["step"] for p in c["curve"]] == [0, 3, 6]
        seconds = [p["train_seconds"] for p in c["curve"]]
        assert seconds[0] == 0 and seconds == sorted(seconds) and seconds[-1] > 0
        per_step = [p["flops"] / p["step"] for p in c["curve"][1:]]
        assert per_step[0] > 0 and per_step[0] == pytest.approx(per_step[1])
    dlm, ar = (c["curve"][1]["flops"] / 3 for c in r["configs"])
    assert ar / dlm == pytest.approx(31 / 32, rel=0.02)  # AR predicts seq_len - 1 tokens per window
    held_out = small_text_path.read_text()[-6000:]  # the last 10% of the 60,000 characters
    counts = np.array(list(Counter(held_out).values()), dtype=np.float64)
    p = counts / counts.sum()
    assert r["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny ar" in capsys.readouterr().out


def test_flops_to_reach_interpolates_and_summary_compares_at_equal_time():
    curve = [{"step": 0, "val_loss": 4.0, "train_seconds": 0.0, "flops": 0.0},
             {"step": 1, "val_loss": 3.0, "train_seconds": 10.0, "flops": 100.0},
             {"step": 2, "val_loss": 2.0, "train_seconds": 20.0, "flops": 200.0}]
    assert learn.flops_to_reach(curve, 2.5) == pytest.approx(150.0)
    assert learn.flops_to_reach(curve, 1.0) is None
    torch_curve = [{"step": 0, "val_loss": 4.0, "train_seconds": 0.0, "flops": 0.0},
                   {"step": 5, "val_loss": 3.5, "train_seconds": 5.0, "flops": 250.0},
                   {"step": 9, "val_loss": 2.5, "train_seconds": 19.0, "flops": 450.0}]
    configs = [{"name": "ours", "objective": "dlm", "curve": curve}]
    s = learn.summarise(configs, {"name": "torch", "final_val": 2.5, "flops": 450.0, "curve": torch_curve})
    assert [c["default_val"] for c in s["at_torch_checkpoints"]] == pytest.approx([3.5, 2.1])
    assert s["default_lower_at_every_checkpoint"] is False  # 3.5 is not lower than 3.5
    assert s["flops_ratio_to_reach_torch_final"]["ours"] == pytest.approx(450.0 / 150.0)


def test_torch_loop_curve_is_measured_by_the_mlx_evaluator(shakespeare):
    needs("torch", "convert")
    args = argparse.Namespace(batch_size=2, seq_len=16, eval_batches=1, eval_every=2, seed=0)
    row = learn.run_torch(shakespeare[:20_000], args, seconds=0.5)
    steps = [c["step"] for c in row["curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 2
    assert row["curve"][0]["val_loss"] > 3.0  # untrained: about log(vocab) or worse
    assert np.isfinite([c["val_loss"] for c in row["curve"]]).all()


def test_finished_runs_in_work_are_reused_and_a_stopped_run_stops_the_benchmark(tmp_path, small_text_path, capsys,
                                                                                monkeypatch):
    argv = ["learn", "--data", str(small_text_path), "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
            "--batch-size", "2", "--seq-len", "16", "--no-defaults", "--work", str(tmp_path / "w"),
            "--config", "a=--preset tiny"]
    bench.main(argv)
    capsys.readouterr()
    bench.main(argv + ["--config", "b=--preset tiny --learning-rate 3e-3"])
    out = capsys.readouterr().out
    assert "== a: reusing the finished run" in out and "== b: mlx_dlm.train" in out

    from mlx_dlm import train

    real = train.train

    def stopped_early(args, *a, **k):  # what a Ctrl-C does: the run checkpoints and returns before its last step
        return real(argparse.Namespace(**{**vars(args), "iters": 2}), *a, **k)

    monkeypatch.setattr(train, "train", stopped_early)
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--config", "c=--preset tiny --seed 1"])
    assert exc.value.code == 1 and "interrupted during 'c'" in capsys.readouterr().err
