"""Crash safety: kill -9 at random moments (also mid-save), SIGINT, non-finite losses, torn checkpoints."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dlm
from mlx_dlm import checkpoint, train
from mlx_dlm.errors import UserError

from conftest import TINY_TRAIN


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "mlx_dlm.train", "--data", str(data), "--out", str(out), *TINY_TRAIN, *extra]


def _finite(model):
    return all(np.isfinite(np.array(v)).all() for _, v in tree_flatten(model.parameters()))


def test_kill9_at_random_times_then_resume(tmp_path, small_text_path):
    out = tmp_path / "run"
    rng = random.Random(0)
    steps = []
    for _ in range(5):
        resume = ["--resume"] if (out / checkpoint.STATE_FILE).exists() else []
        proc = subprocess.Popen(_cmd(small_text_path, out, "--iters", "100000", "--save-every", "1",
                                     "--eval-every", "100000", *resume),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / checkpoint.STATE_FILE).exists():
            continue  # killed before the first checkpoint completed
        state = checkpoint.restore(out)  # a complete pair is always there
        model, _ = mlx_dlm.load(out)
        assert _finite(model)
        steps.append(state["step"])
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] > steps[0]
    final = steps[-1] + 3
    subprocess.run(_cmd(small_text_path, out, "--iters", str(final), "--resume", "--eval-every", "100000"),
                   check=True, capture_output=True)
    assert json.loads((out / checkpoint.STATE_FILE).read_text())["step"] == final
    rows = [json.loads(line) for line in (out / checkpoint.METRICS_FILE).read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == final  # no torn or duplicated rows


def test_sigint_saves_a_loadable_checkpoint(tmp_path, small_text_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(small_text_path, out, "--iters", "100000", "--eval-every", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for training to be under way
        if line.startswith("Iter 10:"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Stopped by SIGINT" in rest and "--resume" in rest
    step = json.loads((out / checkpoint.STATE_FILE).read_text())["step"]
    assert step >= 10
    model, _ = mlx_dlm.load(out)
    assert _finite(model)


def test_torn_checkpoint_falls_back_to_the_previous_pair(tmp_path, small_text_path, capsys):
    out = tmp_path / "run"
    train.main(["--data", str(small_text_path), "--out", str(out), "--iters", "4", "--save-every", "2",
                "--eval-every", "100", *TINY_TRAIN])
    previous_model = (out / "model.prev.safetensors").read_bytes()
    (out / checkpoint.OPTIMIZER_FILE).write_bytes((out / checkpoint.OPTIMIZER_FILE).read_bytes()[:100])
    assert checkpoint.restore(out)["step"] == 2
    assert "newest checkpoint in" in capsys.readouterr().err  # the fallback is said, not silent
    assert (out / "model.safetensors").read_bytes() == previous_model
    (out / "optimizer.prev.safetensors").unlink()
    (out / checkpoint.OPTIMIZER_FILE).write_bytes(b"")
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.restore(out)


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, small_text_path, capsys):
    common = ["--data", str(small_text_path), "--iters", "12", "--save-every", "4", "--eval-every", "100",
              "--learning-rate", "1e9", "--warmup", "0", "--grad-clip", "0", *TINY_TRAIN]
    with pytest.raises(SystemExit) as exc:
        train.main([*common, "--out", str(tmp_path / "stop")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "non-finite at step" in err and len(err.strip().splitlines()) == 1
    train.main([*common, "--out", str(tmp_path / "skip"), "--skip-nonfinite"])
    state = json.loads((tmp_path / "skip" / checkpoint.STATE_FILE).read_text())
    assert state["step"] == 12 and state["skipped"] > 0
    model, _ = mlx_dlm.load(tmp_path / "skip")
    assert _finite(model)


def test_second_sigint_aborts_at_once_even_mid_step(tmp_path, small_text_path):
    # Steps of ~1 s or more: the second Ctrl-C lands inside MLX's computation, where no Python handler runs.
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_dlm.train", "--data", str(small_text_path), "--out", str(out),
                             "--preset", "simple_dlm", "--batch-size", "32", "--iters", "1000", "--report-every", "1",
                             "--eval-every", "1000", "--sample-tokens", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Iter 2:"):
            break
    tic = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    waited = time.perf_counter() - tic
    step_seconds = 1 / float(line.split("It/sec ")[1].split(",")[0])
    err = proc.stderr.read()
    assert proc.returncode == 130 and "Aborted by a second Ctrl-C" in err and "Ctrl-C again to abort" in err
    assert waited < 0.3 + step_seconds / 2  # at once, not after finishing the step
    assert not (out / checkpoint.STATE_FILE).exists()  # aborted: no save after the second Ctrl-C
