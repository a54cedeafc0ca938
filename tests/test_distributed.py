"""Data-parallel training over mx.distributed (ring backend on loopback), against one process; and the
distributed branches in this process, with the collective replaced by a recording stand-in (where mutation testing
sees them: it does not follow subprocesses)."""

import dataclasses
import json
import shutil
import subprocess
import sys

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_dlm
from mlx_dlm import checkpoint, train

from conftest import TINY_TRAIN, metrics_rows, untrained

needs_launcher = pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not installed")

COMMON = ["--preset", "tiny", "--iters", "6", "--seq-len", "32", "--eval-every", "3", "--sample-tokens", "0",
          "--seed", "0"]


def _params(path):
    model, _ = mlx_dlm.load(path)
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _val_rows(path):
    return [r for r in metrics_rows(path) if "val_loss" in r]


@needs_launcher
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
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 2e-6  # docs/training.md: 1.1e-6 measured; float sums reorder
    # The logged training loss and gradient norm are the global batch's: averaged over the processes.
    logged = [[r for r in metrics_rows(tmp_path / name) if "train_loss" in r] for name in ("two", "one")]
    assert len(logged[0]) == 1 and np.allclose([(r["train_loss"], r["grad_norm"]) for r in logged[0]],
                                               [(r["train_loss"], r["grad_norm"]) for r in logged[1]], rtol=1e-5, atol=0)
    assert logged[0][0]["tokens_per_sec"] == pytest.approx(logged[0][0]["it_per_sec"] * 2 * 4 * 32)  # global batch

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


class _Collective:
    """Stands in for mx.distributed.all_sum: records each call in events and adds what the other processes
    contribute (`others`, zero by default)."""

    def __init__(self, events: list, others: float = 0.0):
        self.events, self.others = events, others

    def __call__(self, x, *args, **kwargs):
        self.events.append(("all_sum", x.item()))
        return x + self.others


@pytest.mark.parametrize("rank, size, expected", [
    (0, 1, ["restore"]),  # one process: no one to wait for
    (0, 2, ["restore", "all_sum"]),  # rank 0 repairs and reads first, then lets the others in
    (1, 2, ["all_sum", "restore"]),  # the others read only after rank 0 is done
])
def test_resume_reads_the_checkpoint_after_rank_0_repaired_it(monkeypatch, tmp_path, rank, size, expected):
    events = []
    monkeypatch.setattr(mx.distributed, "all_sum", _Collective(events))
    monkeypatch.setattr(train.checkpoint, "restore", lambda out: events.append(("restore", out)) or {"step": 7})
    assert train._restore(tmp_path, rank, size) == {"step": 7}
    assert [e[0] for e in events] == expected
    assert [e[1] for e in events if e[0] == "restore"] == [tmp_path]


@pytest.mark.parametrize("here, elsewhere, stops", [(None, 0.0, False), (None, 1.0, True), ("SIGINT", 0.0, True),
                                                    ("SIGTERM", 1.0, True)])
def test_every_process_stops_when_any_got_a_signal(monkeypatch, here, elsewhere, stops):
    events = []
    monkeypatch.setattr(mx.distributed, "all_sum", _Collective(events, others=elsewhere))
    assert train._stopping(SimpleNamespace(size=2), SimpleNamespace(signal=here)) is stops
    assert events == [("all_sum", float(here is not None))]
    events.clear()
    assert train._stopping(SimpleNamespace(size=1), SimpleNamespace(signal=here)) is (here is not None)
    assert events == []  # one process asks no one


def test_validation_shards_sum_to_the_single_process_loss(monkeypatch, shakespeare):
    """Each of 2 processes scores every other batch (same windows, same masks) and the totals are summed: the two
    processes' shares add up to one process's loss over all batches, an uneven last batch included."""
    model, tok = untrained(shakespeare[:2000], max_seq_len=16)
    windows = np.random.default_rng(0).integers(1, tok.vocab_size, size=(9, 16)).astype(np.int32)  # batches 2,2,2,2,1
    events = []
    monkeypatch.setattr(mx.distributed, "all_sum", _Collective(events))  # the other process adds nothing here
    whole = train.make_evaluator(model, windows, tok.mask_id, batch_size=2)()
    assert events == []  # one process sums nothing
    shares = [train.make_evaluator(model, windows, tok.mask_id, batch_size=2, shard=(rank, 2))() for rank in (0, 1)]
    assert len(events) == 2  # one sum per evaluation
    assert sum(shares) == pytest.approx(whole, rel=1e-6)
    assert shares[0] > shares[1] > 0  # rank 0 holds three batches, rank 1 two


def test_banner_names_the_effective_batch_of_several_processes(tmp_path, small_text_path):
    args = train.setup_arg_parser().parse_args(["--data", str(small_text_path), "--out", str(tmp_path / "run"),
                                                *TINY_TRAIN])
    run = train.prepare(args)
    one, two = train._banner(run), train._banner(dataclasses.replace(run, size=2))
    assert ", batch 8 x 64, " in one
    assert two == one.replace(", batch 8 x 64, ", ", batch 8 x 64 per process x 2 processes = effective batch 16, ")


@pytest.mark.parametrize("drift, verdict", [(0.0, "yes"), (1e-3, "NO")])
def test_closing_line_says_whether_the_replicas_agree(monkeypatch, drift, verdict):
    """Every process's fingerprint gathered: identical on both, or one weight moved on the other process."""
    model = untrained("abcdefgh", max_seq_len=16)[0]
    other = train._fingerprint(model) + mx.array([drift, 0.0, 0.0])
    monkeypatch.setattr(mx.distributed, "all_gather", lambda x, *a, **k: mx.concatenate([x, other[None]]))
    line = train._replicas_agree(SimpleNamespace(model=model, size=2))
    assert line == f"Parameters identical on all 2 processes: {verdict}"


class _Group:
    """Stands in for mx.distributed.init()'s group: this process is `rank` of `size`."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = (lambda: rank), (lambda: size)


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_writes_or_prints_while_preparing(monkeypatch, tmp_path, small_text_path, capsys, rank):
    """Resuming: rank 0 trims the metrics rows the checkpoint never saw and says what a changed --iters does; a
    fresh run: rank 0 makes --out. The other processes leave files and console alone."""
    out, parse = tmp_path / "run", train.setup_arg_parser().parse_args
    train.main(["--data", str(small_text_path), "--out", str(out), *TINY_TRAIN, "--iters", "2", "--eval-every", "1"])
    rows = out / checkpoint.METRICS_FILE
    saved = rows.read_text()
    rows.write_text(saved + json.dumps({"step": 3, "train_loss": 1.0}) + "\n")  # written after the last checkpoint
    capsys.readouterr()
    monkeypatch.setattr(mx.distributed, "init", lambda *a, **k: _Group(rank, 2))
    events, restore = [], checkpoint.restore
    monkeypatch.setattr(mx.distributed, "all_sum", _Collective(events))
    monkeypatch.setattr(checkpoint, "restore", lambda path: events.append(("restore",)) or restore(path))
    run = train.prepare(parse(["--resume", "--out", str(out), "--iters", "4"]), explicit={"resume", "out", "iters"})
    assert (run.rank, run.size, run.progress.step, run.args.iters) == (rank, 2, 2, 4)
    assert [e[0] for e in events] == ["restore", "all_sum"][::1 if rank == 0 else -1]  # rank 0 repairs first
    assert rows.read_text() == (saved if rank == 0 else saved + json.dumps({"step": 3, "train_loss": 1.0}) + "\n")
    note = "note: --iters changed on resume: the cosine schedule now ends at step 4 (was 2)\n"
    assert capsys.readouterr().err == (note if rank == 0 else "")
    fresh = tmp_path / "fresh"
    train.prepare(parse(["--data", str(small_text_path), "--out", str(fresh), *TINY_TRAIN]))
    assert fresh.is_dir() is (rank == 0)


def test_a_stop_voted_by_another_process_names_no_signal_of_its_own(monkeypatch, tmp_path, small_text_path, capsys):
    """Another process got the signal: this one stops at the same step with a checkpoint and says so."""
    monkeypatch.setattr(train, "_stopping", lambda run, stop: run.progress.step >= 2)
    out = tmp_path / "run"
    train.main(["--data", str(small_text_path), "--out", str(out), *TINY_TRAIN, "--iters", "10", "--eval-every", "100"])
    assert capsys.readouterr().out.splitlines()[-1] == (f"Stopped by a signal at step 2; checkpoint saved in {out}. "
                                                        f"Resume with: mlx_dlm.train --resume --out {out}")
    assert json.loads((out / checkpoint.STATE_FILE).read_text())["step"] == 2
