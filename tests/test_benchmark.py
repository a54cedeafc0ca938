"""The benchmark harness: rows, fields, quality columns, plot, training speed (no timing asserted)."""

import importlib
import importlib.util
import json
import shutil

import mlx_dlm
import numpy as np
import pytest

from conftest import cli_error, needs

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
    out = capsys.readouterr().out
    assert results["machine"]["cpu"] and results["machine"]["cpu"] in out  # named on the "Machine:" line
    ar = [r for r in rows if r["model"] == "ar"]
    dlm = [r for r in rows if r["model"] == "dlm"]
    assert sorted(r["batch_size"] for r in ar) == [1, 2]
    sweep = [r for r in dlm if r["variant"] == "-"]
    assert len(sweep) == 2 * 2 * 2  # batch sizes x strategies x steps
    assert sorted(r["variant"] for r in dlm if r["batch_size"] == 1 and r["variant"] != "-") == \
        ["blk8", "blk8+dual", "blk8+dual+thr0.5", "blk8+prefix", "remask0.2", "thr0.5"]
    cached = {r["variant"]: r for r in dlm if r["batch_size"] == 2 and r["variant"].startswith("blk")}
    assert cached["blk8+dual"]["forward_tokens"] < cached["blk8+prefix"]["forward_tokens"] < cached["blk8"]["forward_tokens"]
    for r in dlm:
        assert r["nfe"] == r["steps"] and r["tokens_per_forward"] == 16 / r["steps"] and r["temp"] == 1.0
        # One trial: the rate is the generated tokens of the whole batch over its decode time.
        assert r["tokens_per_sec"] == pytest.approx(16 * r["batch_size"] / (r["decode_ms"] / 1e3), rel=1e-6)
        assert r["tokens_per_sec_min"] == r["tokens_per_sec"] == r["tokens_per_sec_max"]
        assert 0 < r["roofline_fraction"]
        assert "gen_ppl" not in r  # random weights: speed only
    for r in ar:
        assert r["nfe"] == 16 and r["tokens_per_forward"] == 1 and r["ms_per_token"] > 0 and r["prompt_ms"] > 0
    assert "tok/s" in out


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path):
    """The first "model name" line of a Linux cpuinfo names the CPU; a file without one, or none, falls back to the
    platform's processor field (possibly empty on Linux), never to an empty name."""
    machine = importlib.import_module("mlx_dlm.benchmark.machine")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n\n"
                    "processor\t: 1\nmodel name\t: Something Else\n")
    assert machine.cpu_model(str(info)) == "Intel(R) Xeon(R) Processor"
    info.write_text("processor\t: 0\nmodel name\t:\nflags\t: fpu\n")
    fallback = machine.cpu_model(str(tmp_path / "missing"))
    assert machine.cpu_model(str(info)) == fallback and fallback
    assert "Intel(R) Xeon(R) Processor" in machine.describe({
        "platform": "Linux", "cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "mlx": "0", "backend": "cpu",
        "blas": "reference"})


def test_rows_timed_in_turns_keep_every_compiled_step(monkeypatch, tiny_model_dir):
    """Every row runs once a round; while they do, a model keeps all rows' compiled steps (a small memo bound would
    otherwise recompile some in timed runs), and the bound is back afterwards."""
    from mlx_dlm import model as model_module
    from mlx_dlm.model import MEMO_ATTRIBUTE

    throughput = importlib.import_module("mlx_dlm.benchmark.throughput")
    monkeypatch.setattr(model_module, "MEMO_MAX_ENTRIES", 2)
    model, tok = mlx_dlm.load(tiny_model_dir)
    settings = [throughput._Setting(model, tok, "ab", max_tokens=8, num_samples=1, steps=s, strategy=strategy)
                for s in (2, 4) for strategy in ("confidence", "random")]
    settings.append(throughput._Setting(model, tok, "ab", max_tokens=8, num_samples=1, steps=4, block_length=4,
                                        cache="dual"))
    throughput._time_in_turns(settings, 2)
    assert [len(s.runs) for s in settings] == [2] * len(settings)
    assert len(model.__dict__[MEMO_ATTRIBUTE]) > 2  # every row's steps were kept through the turns
    assert model_module.MEMO_MAX_ENTRIES == 2


def test_rows_run_at_the_blas_thread_count_asked(monkeypatch, tmp_path):
    """--blas-threads holds OpenBLAS at that many threads while the rows run, the results record it, and the count
    from before comes back; where MLX does not run on an OpenBLAS that mlx_dlm loaded there is nothing to set."""
    from mlx_dlm import blas

    throughput = importlib.import_module("mlx_dlm.benchmark.throughput")
    seen, once = [], throughput._Setting.once

    def counting_once(self, seed, timed=True):
        seen.append(blas.get_threads())
        once(self, seed, timed)

    monkeypatch.setattr(throughput._Setting, "once", counting_once)
    before, out = blas.get_threads(), tmp_path / "r.json"
    bench.main(["--preset", "tiny", "--trials", "1", "--steps", "4", "--strategies", "confidence", "--batch-size", "1",
                "--max-tokens", "8", "--blas-threads", "1", "--out", str(out)])
    recorded = json.loads(out.read_text())["machine"]["blas_threads"]
    expected = None if before is None else 1
    assert (recorded, set(seen)) == (expected, {expected})
    assert blas.get_threads() == before


def test_trained_pair_fills_quality(tmp_path, tiny_model_dir, tiny_ar_dir, small_text_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    bench.main(["--dlm", str(tiny_model_dir), "--ar", str(tiny_ar_dir), "--data", str(small_text_path),
                "--judge", "ngram", "--trials", "2", "--steps", "8", "--strategies", "confidence",
                "--batch-size", "1,2", "--ar-temps", "1,0.5", "--ar-top-k", "0,5", "--temp", "1,0.5",
                "--max-tokens", "24", "--reference-windows", "16", "--draft-lengths", "3", "--out", str(out)]
               + (["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []))
    results = json.loads(out.read_text())
    q = results["quality"]
    assert q["dlm_val_elbo"] > 0 and q["ar_val_nll"] > 0 and 0 <= q["dlm_infill_accuracy"] <= 1
    assert results["judges"] == {"ngram6": {"self_judged": []}}
    ref = results["reference"]
    assert ref["windows"] == 16 and 1 < ref["gen_ppl"]["ngram6"] < 100 and ref["entropy_bits"] > 3
    rows = results["rows"]
    ar = {(r["batch_size"], r["variant"]): r for r in rows if r["model"] == "ar"}
    assert sorted(ar) == [(b, v) for b in (1, 2) for v in ("-", "T0.5", "T0.5,k5", "T1,k5")]
    assert (ar[(1, "-")]["temp"], ar[(1, "-")]["top_k"]) == (1.0, 0)
    assert (ar[(2, "T0.5,k5")]["temp"], ar[(2, "T0.5,k5")]["top_k"]) == (0.5, 5)
    count = 2 * (1 + 2) * (24 - 3)  # the fewest 4-grams of any setting: 6 samples of 24 characters
    assert ref["distinct4_count"] == count
    for r in rows:
        assert 1 < r["gen_ppl"]["ngram6"] < 1e4 and 0 < r["entropy_bits"] < 7 and 0 < r["distinct4"] <= 1
        assert r["quality_samples"] == 2 * (1 + 2) and r["distinct4_count"] == count  # pooled over batch sizes
    for v in ("-", "T0.5,k5"):  # one setting, one quality, whatever the batch size
        assert ar[(1, v)]["gen_ppl"] == ar[(2, v)]["gen_ppl"]
    spec = {(r["batch_size"], r["temp"]): r for r in rows if r["model"] == "spec"}
    assert sorted(spec) == [(b, t) for b in (1, 2) for t in (0.5, 1.0)]
    assert all(r["draft_length"] == 3 for r in spec.values())
    for r in spec.values():  # each round adds its kept drafts and one token, per row; a batch waits for its slowest
        assert 1 <= r["tokens_per_round"] <= 4 and r["steps"] >= 24 / r["tokens_per_round"] * 0.8
        assert r["batch_size"] > 1 or r["tokens_per_round"] == pytest.approx(24 / r["steps"], rel=0.2)
        assert len(r["acceptance_by_position"]) == 3 and r["acceptance_by_position"] == sorted(
            r["acceptance_by_position"], reverse=True)
    first = results["equal_quality"][0]["per_ar_setting"][0]
    assert first["speculative"]["temp"] == 1.0
    assert first["speculative"]["tokens_per_sec"] == spec[(1, 1.0)]["tokens_per_sec"]
    dlm = {(r["batch_size"], r["temp"]): r for r in rows if r["model"] == "dlm"}
    assert sorted(dlm) == [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
    assert dlm[(1, 0.5)]["gen_ppl"] == dlm[(2, 0.5)]["gen_ppl"] != dlm[(1, 1.0)]["gen_ppl"]
    assert [s["batch_size"] for s in results["equal_quality"]] == [1, 2]
    assert "real text (16 windows)" in capsys.readouterr().out
    if png.exists():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_contestant_as_judge_is_refused(tiny_model_dir, tiny_ar_dir, small_text_path, capsys):
    argv = ["--dlm", str(tiny_model_dir), "--ar", str(tiny_ar_dir), "--data", str(small_text_path),
            "--judge", str(tiny_ar_dir), "--trials", "1", "--steps", "4", "--strategies", "confidence",
            "--batch-size", "1", "--max-tokens", "8", "--reference-windows", "4"]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and len(err.strip().splitlines()) == 1
    assert f"the judge {tiny_ar_dir} has the weights of --ar {tiny_ar_dir}" in err
    bench.main(argv + ["--allow-self-judge"])
    assert f"(self-judged: it has the weights of --ar {tiny_ar_dir})" in capsys.readouterr().out


def _row(model, tps, ppl, variant="-", batch=1, distinct4=0.8, entropy=4.5):
    return {"model": model, "batch_size": batch, "tokens_per_sec": tps, "variant": variant, "strategy": "confidence",
            "steps": 8, "temp": 1.0, "gen_ppl": ppl, "entropy_bits": entropy, "distinct4": distinct4}


def test_equal_quality_needs_every_judge_and_the_diversity():
    from mlx_dlm.benchmark.throughput import equal_quality

    rows = [_row("ar", 100.0, {"a": 5.0, "b": 3.0}), _row("ar", 500.0, {"a": 4.0, "b": 2.0}, "T0.5"),
            _row("dlm", 900.0, {"a": 5.4, "b": 3.4}, "fast but one judge disagrees"),
            _row("dlm", 800.0, {"a": 5.4, "b": 3.2}, "repetitive", distinct4=0.7),
            _row("dlm", 700.0, {"a": 5.4, "b": 3.2}, "low entropy", entropy=4.35),
            _row("dlm", 300.0, {"a": 5.5, "b": 3.3}, "match"),
            _row("dlm", 200.0, {"a": 4.4, "b": 2.2}, "matches T0.5 too", distinct4=0.76, entropy=4.41),
            _row("ar", 10.0, {"a": 5.0, "b": 3.0}, batch=8), _row("dlm", 5.0, {"a": 9.0, "b": 9.0}, batch=8)]
    one, eight = equal_quality(rows, tolerance=0.10)
    default, cooler = one["per_ar_setting"]
    assert default["fastest_match"]["variant"] == "match" and default["fastest_match"]["speedup"] == pytest.approx(3)
    assert cooler["fastest_match"]["variant"] == "matches T0.5 too"
    assert cooler["fastest_match"]["speedup"] == pytest.approx(0.4)
    assert eight["per_ar_setting"][0]["fastest_match"] is None


def test_a_matching_block_setting_is_named_in_the_summary(capsys):
    """A block-diffusion row of the AR's quality is the summary's block match, and the printed line names its
    setting (blocks of 2, one pass per position, left order) and its speed over the AR's."""
    from mlx_dlm.benchmark.throughput import _print_summary, equal_quality

    block = {**_row("block", 80.0, {"a": 5.2}), "strategy": "left", "block_size": 2, "steps_per_block": 2.0}
    fast = {**block, "tokens_per_sec": 150.0, "gen_ppl": {"a": 30.0}, "steps_per_block": 1.0}
    summary = equal_quality([_row("ar", 100.0, {"a": 5.0}), block, fast])
    match = summary[0]["per_ar_setting"][0]["block_match"]
    assert (match["tokens_per_sec"], match["speedup"]) == (80.0, pytest.approx(0.8))
    _print_summary(summary, 0.10)
    assert "fastest block match BD2 2/block left T1: 80.0 tok/s = 0.80x" in capsys.readouterr().out


def test_time_per_pass_is_each_runs_own_when_the_passes_vary():
    """Speculative runs take different numbers of rounds: 10 rounds in 0.1 s, 20 in 0.3 s and 40 in 0.2 s are 10, 15
    and 5 ms a round, median 10 ms (not the median time over the last run's rounds, 5 ms); the passes reported are
    the median run's (20), and the tokens per pass 140 / the mean 70/3 rounds. An AR run's prompt pass is not a
    decode pass: 11 passes with one in the prompt are 10 in 0.1 s, 10 ms each."""
    from mlx_dlm.benchmark.throughput import _Setting
    from mlx_dlm.decoding import GenerationStep

    def run(nfe, seconds, prompt_pass_tokens=0):
        empty = np.zeros((0, 4), dtype=np.int32)
        return GenerationStep(step=nfe, tokens=empty, editable=np.ones(4, dtype=bool), committed=empty,
                              remasked=empty, generated_tokens=140, nfe=nfe, forward_tokens=0,
                              elapsed=1.0 + seconds, prompt_seconds=1.0, prompt_pass_tokens=prompt_pass_tokens)

    setting = _Setting(None, None, "", max_tokens=140)
    setting.runs = [run(10, 0.1), run(20, 0.3), run(40, 0.2)]
    stats, _ = setting.stats()
    assert stats["ms_per_forward"] == pytest.approx(10.0)
    assert (stats["nfe"], stats["nfe_runs"]) == (20, [10, 20, 40])
    assert stats["tokens_per_forward"] == pytest.approx(140 / (70 / 3))
    setting.runs = [run(11, 0.1, prompt_pass_tokens=1)]
    assert setting.stats()[0]["ms_per_forward"] == pytest.approx(10.0)


def test_the_speculative_speedup_is_also_paired_trial_by_trial(capsys):
    """11 trials on a machine whose speed drifts: each trial's speculative rate over that trial's AR rate gives
    the ratios 1.0, 1.1, .., 2.0 (shuffled): their median 1.5x and the 98.8% order-statistic interval, the 2nd to
    the 10th, 1.1-1.9x; the printed line gives it beside the ratio of the medians."""
    from statistics import median

    from mlx_dlm.benchmark.throughput import _print_summary, equal_quality

    ar_runs = [100.0, 80.0, 60.0, 90.0, 70.0, 100.0, 50.0, 95.0, 85.0, 65.0, 75.0]
    ratios = [1.0 + 0.1 * i for i in np.random.default_rng(0).permutation(11)]
    spec_runs = [a * r for a, r in zip(ar_runs, ratios)]
    ar = {**_row("ar", median(ar_runs), {"a": 5.0}), "tokens_per_sec_runs": ar_runs}
    spec = {**_row("spec", median(spec_runs), {"a": 5.0}), "draft_length": 3, "tokens_per_sec_runs": spec_runs}
    block = {**_row("block", 10.0, {"a": 9.0}), "block_size": 2, "steps_per_block": 2.0}
    summary = equal_quality([ar, spec, block])
    brief = summary[0]["per_ar_setting"][0]["speculative"]
    pair = brief["paired_speedup"]
    assert (pair["median"], pair["low"], pair["high"], pair["count"]) == (pytest.approx(1.5), pytest.approx(1.1),
                                                                          pytest.approx(1.9), 11)
    assert pair["coverage"] == pytest.approx(1 - 2 * (1 + 11) / 2 ** 11)
    _print_summary(summary, 0.10)
    assert (f"= {brief['speedup']:.2f}x (paired by trial: median 1.50x, 99% interval 1.10-1.90x over 11 trials)"
            in capsys.readouterr().out)


def test_frontier_interpolation_against_a_hand_computed_example():
    """DLM settings at (genPPL, tok/s) (4, 50), (8, 200), (16, 800) and a dominated (10, 100); AR at (2, 100) and
    (3, 200). In log-log space, genPPL 4 x sqrt(2) lies halfway from 4 to 8: sqrt(50 x 200) = 100 tok/s."""
    from mlx_dlm.benchmark.frontier import pareto, speed_at, speed_ratio

    dlm = pareto([(8.0, 200.0), (4.0, 50.0), (10.0, 100.0), (16.0, 800.0)])
    ar = pareto([(3.0, 200.0), (2.0, 100.0)])
    assert dlm == [(4.0, 50.0), (8.0, 200.0), (16.0, 800.0)] and ar == [(2.0, 100.0), (3.0, 200.0)]
    assert speed_at(dlm, 4 * 2**0.5) == pytest.approx(100.0)
    assert speed_at(dlm, 12.0) == pytest.approx(200 * 4 ** (np.log(1.5) / np.log(2)))
    assert speed_at(dlm, 3.0) is None and speed_at(dlm, 20.0) == 800.0  # cannot reach 3; 16 is already better
    assert speed_ratio(dlm, ar, 3.0) is None and speed_ratio(dlm, ar, 16.0) == pytest.approx(4.0)
    assert speed_ratio(ar, dlm, 2 * 1.5**0.5) is None


def test_the_frontier_ratio_uses_only_settings_as_diverse_as_the_ar():
    from mlx_dlm.benchmark.throughput import equal_quality

    rows = [_row("ar", 100.0, {"a": 4.0}), _row("ar", 150.0, {"a": 3.0}, "T0.7"),
            _row("dlm", 400.0, {"a": 8.0}), _row("dlm", 100.0, {"a": 2.0}),
            _row("dlm", 9000.0, {"a": 3.0}, "repetitive", distinct4=0.5)]
    summary = equal_quality(rows)[0]
    f = summary["frontier"]["a"]
    assert f["dlm_frontier"] == [(2.0, 100.0), (8.0, 400.0)] and f["at_gen_ppl"] == 4.0
    assert f["speed_ratio"] == pytest.approx(200.0 / 100.0) and summary["frontier_ratio"] == f["speed_ratio"]


def test_plot(tmp_path):
    needs("matplotlib", "plot")
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
    with pytest.raises(SystemExit) as exc:
        bench.main(["--preset", "tiny", "--blas-threads", "-1"])
    assert exc.value.code == 1 and "--blas-threads must be 0" in capsys.readouterr().err


def test_train_speed_side_by_side_with_torch(tmp_path):
    needs("torch", "convert")
    out = tmp_path / "t.json"
    bench.main(["train", "--preset", "simple_dlm", "--batch-size", "2", "--seq-len", "16", "--steps", "1",
                "--trials", "1", "--warmup", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["torch"]["steps_per_sec"] > 0
    assert r["torch"]["mlx_over_torch"] == pytest.approx(r["train"]["steps_per_sec"] / r["torch"]["steps_per_sec"])


def test_profile_rows_add_up(tmp_path):
    out = tmp_path / "p.json"
    bench.main(["profile", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
                "--variants", "shipped,not-compiled", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["step_s"] > 0 and r["forward_s"] > 0 and r["loss_and_gradients_s"] > 0
    assert r["explained_s"] == pytest.approx(sum(row["forward_backward_s"] * row["count"] for row in r["rows"]))
    counts = {row["op"].split(" (")[0]: row["count"] for row in r["rows"]}
    assert counts["softmax"] == 2 and counts["rmsnorm"] == 2 * 2 + 1  # per layer (2 layers), plus the final norm
    assert counts["AdamW update"] == 1 and counts["fused scaled_dot_product_attention"] == 0
    assert {row["op"].split(" (")[0] for row in r["rows"] if row["matmul"]} == {
        "qkv projection", "attention scores q @ k^T", "attention x values", "attention output projection",
        "MLP in", "MLP out", "output layer"}
    assert [v["variant"] for v in r["variants"]] == ["shipped", "not-compiled"]
    assert r["machine"]["cpu_compile"] in ("fuses (g++ found)", "no fusion (g++ not found)")


@pytest.mark.parametrize("variant", ["explicit-attention", "composed-softmax", "composed-layernorm"])
@pytest.mark.parametrize("causal", [False, True])
def test_profile_variants_compute_the_same_model(variant, causal):
    """A variant changes how the step is computed, never what: the same logits as the shipped mx.fast kernels
    (LayerNorm layout, so every patched path runs; causal and bidirectional masks)."""
    import mlx.core as mx

    from mlx_dlm.benchmark import profile
    from mlx_dlm.model import init_model, preset_args

    args = preset_args("simple_dlm", dim=64, n_layers=2, hidden_dim=128, n_heads=2,
                       model_type="ar" if causal else "dlm")
    tokens = mx.random.randint(1, 66, (2, 24), key=mx.random.key(0))
    t = mx.full((2,), 0.4)
    model = init_model(args, seed=0)
    want = model(tokens, t)
    with profile.VARIANTS[variant]():
        got = model(tokens, t)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_each_drafter_gets_its_own_speculative_rows(tmp_path, tiny_model_dir, tiny_ar_dir, small_text_path, capsys):
    """--draft repeated: speculative rows for each drafter (each K, temperature and batch size), timed in turns
    with the rest, each named by its drafter in the record, the summary and the plot's legend; a drafter named
    twice is a one-line error."""
    other = tmp_path / "other-drafter"
    shutil.copytree(tiny_model_dir, other)
    out = tmp_path / "r.json"
    base = ["--dlm", str(tiny_model_dir), "--ar", str(tiny_ar_dir), "--data", str(small_text_path), "--judge",
            "ngram", "--trials", "1", "--steps", "8", "--strategies", "confidence", "--batch-size", "1,2",
            "--max-tokens", "16", "--reference-windows", "8", "--draft-lengths", "2,3", "--out", str(out)]
    bench.main([*base, "--draft", str(tiny_model_dir), "--draft", str(other)])
    printed = capsys.readouterr().out
    spec = [r for r in json.loads(out.read_text())["rows"] if r["model"] == "spec"]
    assert sorted((r["drafter"], r["batch_size"], r["draft_length"]) for r in spec) == sorted(
        (str(d), b, k) for d in (tiny_model_dir, other) for b in (1, 2) for k in (2, 3))
    assert {r["variant"] for r in spec if r["drafter"] == str(other)} == {"spec2-2", "spec3-2"}
    throughput = importlib.import_module("mlx_dlm.benchmark.throughput")
    mine = next(r for r in spec if r["drafter"] == str(other))
    assert throughput._label(mine).endswith("(other-drafter)") and "other-drafter" in throughput._family(mine)
    assert "(other-drafter)" in printed
    assert "names a drafter twice" in cli_error(capsys, bench.main, [*base, "--draft", str(other), "--draft",
                                                                     str(other)])
