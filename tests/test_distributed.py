"""Data-parallel training over mx.distributed (ring backend on loopback), against one process."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dlm

from conftest import metrics_rows

pytestmark = pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")

COMMON = ["--preset", "tiny", "--iters", "6", "--seq-len", "32", "--eval-every", "3", "--sample-tokens", "0",
          "--seed", "0"]


def _params(path):
    model, _ = mlx_dlm.load(path)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _val_rows(path):
    return [r for r in metrics_rows(path) if "val_loss" in r]


def test_two_processes_match_one_with_twice_the_batch(tmp_path, small_text_path):
    two = subprocess.run(["mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "mlx_dlm.train",
                          "--data", str(small_text_path), "--batch-size", "4", "--eval-batches", "2",
                          "--out", str(tmp_path / "two"), *COMMON], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "effective batch 8" in two.stdout and "Parameters identical on all 2 processes: yes" in two.stdout
    assert two.stdout.count("Saved model to") == 1  # only rank 0 writes and prints
    one = subprocess.run([sys.executable, "-m", "mlx_dlm.train", "--data", str(small_text_path), "--batch-size", "8",
                          "--eval-batches", "1", "--out", str(tmp_path / "one"), *COMMON],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    a, b = _params(tmp_path / "two"), _params(tmp_path / "one")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 2e-6  # README: "4e-7" measured; float sums reorder

    # Validation: each process scores every other batch and the totals are summed across processes. A single
    # process scoring the same batches (batch 4, 2 batches) must find the same loss before training.
    same = subprocess.run([sys.executable, "-m", "mlx_dlm.train", "--data", str(small_text_path), "--batch-size", "4",
                           "--eval-batches", "2", "--out", str(tmp_path / "same"), *COMMON[:2], "--iters", "1",
                           *COMMON[4:]], capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stderr
    first = [_val_rows(tmp_path / name)[0] for name in ("two", "same")]
    assert first[0]["step"] == first[1]["step"] == 0
    assert first[0]["val_loss"] == pytest.approx(first[1]["val_loss"], abs=1e-6)

    # Resume with two processes continues the same run.
    more = subprocess.run(["mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "mlx_dlm.train",
                           "--data", str(small_text_path), "--batch-size", "4", "--eval-batches", "2", "--resume",
                           "--out", str(tmp_path / "two"), *COMMON[:2], "--iters", "8", *COMMON[4:]],
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    assert "Resuming from step 6" in more.stdout and "Saved model to" in more.stdout
