"""Commands end to end, and bad input: one line on stderr, non-zero exit, no traceback."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_dlm import train
from mlx_dlm.cli import COMMANDS
from mlx_dlm.errors import SIGPIPE_EXIT

generate = importlib.import_module("mlx_dlm.generate")  # the module; mlx_dlm.generate is also the API function

from conftest import TINY_TRAIN, cli_error


def _one_line_error(capsys, main, argv, match):
    assert match in cli_error(capsys, main, argv)


def test_generate_cli_prints_text_and_stats(tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "mlx_dlm", "generate", "--model", str(tiny_model_dir),
                           "--prompt", "ROMEO:", "--max-tokens", "128", "--steps", "16", "--seed", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text, stats = proc.stdout.split("\n==========\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 128
    assert "Generation: 128 tokens," in stats and "tokens-per-sec, 16 steps" in stats
    assert "Peak memory:" in stats


def test_generate_quiet(tiny_model_dir, capsys):
    generate.main(["--model", str(tiny_model_dir), "--prompt", "AB", "--max-tokens", "10", "--steps", "2",
                   "--verbose", "false", "--seed", "1"])
    out = capsys.readouterr().out
    assert out.startswith("AB") and len(out) == len("AB") + 10 + 1  # the text and its newline only


def test_train_errors(capsys, tmp_path, small_text_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short for a window")
    out = ["--out", str(tmp_path / "run")]  # never the default ./checkpoints of whatever folder the tests run in
    _one_line_error(capsys, train.main, ["--data", str(tmp_path / "missing.txt"), *out, *TINY_TRAIN], "does not exist")
    _one_line_error(capsys, train.main, ["--data", str(empty), *out, *TINY_TRAIN], "is empty")
    _one_line_error(capsys, train.main, ["--data", str(short), "--out", str(tmp_path / "o"), *TINY_TRAIN],
                    "training data has 20 tokens, fewer than one window of --seq-len 64; use more text or a shorter "
                    "--seq-len")
    _one_line_error(capsys, train.main, ["--data", str(small_text_path), *out, "--preset", "galactic"], "unknown preset")
    _one_line_error(capsys, train.main, ["--data", str(small_text_path), *out, *TINY_TRAIN, "--cpu-streams", "3"],
                    "--cpu-streams must be at least 1 and divide --batch-size 8, got 3")
    _one_line_error(capsys, train.main, ["--data", str(small_text_path), *out, *TINY_TRAIN, "--dropout", "1"],
                    "--dropout must be in [0, 1), got 1.0")
    _one_line_error(capsys, train.main, ["--data", str(small_text_path), *out, *TINY_TRAIN, "--ema", "-0.5"],
                    "--ema must be a decay in [0, 1)")
    _one_line_error(capsys, train.main, ["--data", str(small_text_path), "--out", str(tmp_path / "s"), *TINY_TRAIN,
                                         "--arch", "subs_mask_id=500"], "subs_mask_id 500 is not a token id")


def test_generate_errors(capsys, tiny_model_dir, tmp_path):
    _one_line_error(capsys, generate.main, ["--model", str(tiny_model_dir), "--prompt", "x" * 250], "exceeds the model's context")
    _one_line_error(capsys, generate.main, ["--model", str(tiny_model_dir), "--prompt", "naïve"], "'ï' (U+00EF) at position 2")
    _one_line_error(capsys, generate.main, ["--model", str(tmp_path / "nowhere")], "does not exist")

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        change(d)
        return ["--model", str(d)]

    _one_line_error(capsys, generate.main, broken("noconfig", lambda d: (d / "config.json").unlink()),
                    "config.json is missing")
    _one_line_error(capsys, generate.main, broken("noweights", lambda d: (d / "model.safetensors").unlink()),
                    "model.safetensors is missing")
    _one_line_error(capsys, generate.main, broken("notok", lambda d: (d / "tokenizer.json").unlink()),
                    "tokenizer.json is missing")
    _one_line_error(capsys, generate.main, broken("truncated", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000])), "not a readable safetensors file")

    def wider(d):
        config = json.loads((d / "config.json").read_text())
        config["dim"] = 128
        (d / "config.json").write_text(json.dumps(config))

    _one_line_error(capsys, generate.main, broken("mismatch", wider), "does not match config.json")

    def other_vocab(d):
        (d / "tokenizer.json").write_text(json.dumps({"type": "char", "chars": "abc"}))

    _one_line_error(capsys, generate.main, broken("vocab", other_vocab), "has 4 tokens but config.json says")


def test_console_scripts_error_without_traceback(tmp_path):
    proc = subprocess.run(["mlx_dlm.train", "--data", str(tmp_path / "missing.txt")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: data file {tmp_path / 'missing.txt'} does not exist"
    assert not (tmp_path / "checkpoints").exists()  # the failed command leaves no empty --out behind
    proc = subprocess.run(["mlx_dlm", "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_local_looking_paths_and_files_get_local_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "model.txt").write_text("not a model")
    _one_line_error(capsys, generate.main, ["--model", "runs/typo"], "model directory runs/typo does not exist")
    _one_line_error(capsys, generate.main, ["--model", "model.txt"], "model.txt is a file, not a model directory")


def test_train_out_under_a_file_is_one_line(tmp_path, small_text_path, capsys):
    (tmp_path / "f").write_text("x")
    _one_line_error(capsys, train.main, ["--data", str(small_text_path), "--out", str(tmp_path / "f" / "run")],
                    "cannot create --out")


def test_options_that_would_be_ignored_warn(tiny_model_dir, tiny_ar_dir, capsys):
    generate.main(["--model", str(tiny_ar_dir), "--prompt", "A", "--max-tokens", "4", "--steps", "2",
                       "--threshold", "0.5", "--verbose", "false"])
    err = capsys.readouterr().err
    assert "--steps, --threshold only apply to diffusion models" in err and len(err.strip().splitlines()) == 1
    generate.main(["--model", str(tiny_ar_dir), "--prompt", "A", "--max-tokens", "4", "--block-steps", "2",
                   "--verbose", "false"])
    assert "--block-steps only applies to diffusion models" in capsys.readouterr().err
    generate.main(["--model", str(tiny_model_dir), "--max-tokens", "4", "--steps", "9", "--cache-refresh", "2",
                       "--verbose", "false"])
    err = capsys.readouterr().err
    assert "--cache-refresh has no effect without --cache" in err and "--steps 9 is more than the 4 positions" in err
    generate.main(["--model", str(tiny_model_dir), "--max-tokens", "4", "--verbose", "false"])
    assert capsys.readouterr().err == ""  # defaults alone never warn


@pytest.mark.parametrize("module, flag", [("mlx_dlm.train", "--batch-size"), ("mlx_dlm.generate", "--steps"),
                                          ("mlx_dlm.eval", "--draws"), ("mlx_dlm.convert.__main__", "--q-bits"),
                                          ("mlx_dlm.benchmark.train_speed", "--trials"),
                                          ("mlx_dlm.benchmark.learn", "--eval-every"),
                                          ("mlx_dlm.benchmark.throughput", "--max-tokens")])
def test_help_shows_defaults(module, flag):
    text = importlib.import_module(module).setup_arg_parser().format_help()
    entry = text[text.index("\n  " + flag) + 1:]  # the option's own entry, not the usage line
    entry = entry[:entry.find("\n  -", 1) if "\n  -" in entry[1:] else len(entry)]
    assert "(default:" in entry, entry


@pytest.mark.parametrize("module", ["mlx_dlm.train", "mlx_dlm.convert.__main__"])
def test_help_shows_every_help_text(module):
    """The flags' help texts live in a HELP table (kept out of mutation testing); each must reach --help."""
    mod = importlib.import_module(module)
    parser = mod.setup_arg_parser()
    shown = " ".join(parser.format_help().split())  # argparse wraps lines
    assert shown.startswith(f"usage: {parser.prog} ")
    for text in mod.HELP.values():
        assert " ".join(text.split()) in shown, text


def _run_with_reader_gone(argv: list[str]) -> subprocess.Popen:
    """Start `python -m argv...` with its stdout a pipe whose reading end is already closed, as after `| head`
    has exited: the first write fails (Python ignores SIGPIPE, so it raises BrokenPipeError)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=write_end, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(write_end)
    return proc


def _quiet_exit(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, SIGPIPE_EXIT), (proc.returncode, err)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_every_command_exits_quietly_when_its_reader_goes_away():
    """`mlx_dlm.X --help | head -0`: every command (and the `mlx_dlm` dispatcher) ends with 0 or 141, no traceback."""
    commands = [["mlx_dlm", "--help"]] + [[module, "--help"] for module in COMMANDS.values()] + [
        ["mlx_dlm.benchmark", sub, "--help"] for sub in ("train", "learn", "profile", "simple-dlm-sampler")]
    procs = [_run_with_reader_gone(argv) for argv in commands]  # side by side: each mostly waits on its imports
    for proc in procs:
        _quiet_exit(proc)


def test_generate_exits_quietly_when_its_reader_goes_away(tiny_model_dir):
    """The issue's case, `mlx_dlm.generate ... | head -3`: the sample's text is what meets the closed pipe."""
    _quiet_exit(_run_with_reader_gone(["mlx_dlm.generate", "--model", str(tiny_model_dir), "--prompt", "ROMEO:",
                                       "--max-tokens", "64", "--steps", "8", "--seed", "0"]))
