"""Data-parallel training over mx.distributed (ring backend on loopback), against one process."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dlm

pytestmark = pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")

COMMON = ["--preset", "tiny", "--iters", "6", "--seq-len", "32", "--eval-every", "3", "--sample-tokens", "0",
          "--seed", "0"]


def _params(path):
    model, _ = mlx_dlm.load(path)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


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
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5

    # Resume with two processes continues the same run.
    more = subprocess.run(["mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "mlx_dlm.train",
                           "--data", str(small_text_path), "--batch-size", "4", "--eval-batches", "2", "--resume",
                           "--out", str(tmp_path / "two"), *COMMON[:2], "--iters", "8", *COMMON[4:]],
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr
    assert "Resuming from step 6" in more.stdout and "Saved model to" in more.stdout
