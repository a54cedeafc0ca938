"""step.py, the training step as researchers and benchmarks use it: plain values in, no command-line flags."""

import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_dlm import step
from mlx_dlm.model import init_model, preset_args

from conftest import learning_rates


def test_make_optimizer_takes_plain_values():
    """Warm-up 2 steps to 0.02, then cosine over the other 6 to 0.25 of the peak, weight decay as given."""
    optimizer = step.make_optimizer(iters=8, learning_rate=0.02, warmup=2, min_lr_ratio=0.25, weight_decay=0.3)
    cosine = [0.02 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * k / 6))) for k in range(6)]
    assert learning_rates(optimizer, 8) == pytest.approx([0.0, 0.01, *cosine])
    assert optimizer.weight_decay == pytest.approx(0.3)
    assert step.make_optimizer(iters=3).weight_decay == step.DEFAULT_WEIGHT_DECAY


def test_step_module_needs_no_flags():
    """Importing the step module loads no argparse (nor any command module), and a fresh interpreter trains a step
    with it."""
    assert "argparse" not in vars(step) and "setup_arg_parser" not in vars(step)
    code = ("import sys\nimport mlx_dlm.step\n"
            "print('argparse' in sys.modules, sorted(m for m in sys.modules if m in ('mlx_dlm.generate', "
            "'mlx_dlm.train', 'mlx_dlm.server', 'mlx_dlm.chat')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "[]"], (out.stdout, out.stderr)
    code = ("import mlx.core as mx, numpy as np\n"
            "from mlx_dlm.step import make_optimizer, make_train_step, training_loss\n"
            "from mlx_dlm.model import init_model, preset_args\n"
            "model = init_model(preset_args('tiny', vocab_size=12, max_seq_len=16), seed=0)\n"
            "run = make_train_step(model, make_optimizer(iters=2), training_loss(model, 0), grad_clip=1.0)\n"
            "loss, norm, ok = run(mx.array(np.arange(32).reshape(2, 16) % 11 + 1, dtype=mx.int32))\n"
            "print(bool(ok.item()), loss.item() > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True"], out.stderr


def test_training_loss_of_an_ar_model_is_its_next_token_nll():
    """The AR objective against a numpy log-softmax of the model's own logits."""
    model = init_model(preset_args("tiny", vocab_size=10, max_seq_len=8, model_type="ar"), seed=1)
    batch = mx.array(np.random.default_rng(0).integers(1, 10, size=(3, 8)), dtype=mx.int32)
    logits = np.array(model(batch)[:, :-1], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(logp, np.array(batch)[:, 1:, None], axis=-1).mean()
    assert step.training_loss(model, 0)(model, batch).item() == pytest.approx(expected, rel=1e-5)


def test_the_generate_name_stays_the_function_after_the_command_module_is_imported():
    import importlib

    import mlx_dlm
    from mlx_dlm import sample

    module = importlib.import_module("mlx_dlm.generate")
    assert mlx_dlm.generate is sample.generate and module.__name__ == "mlx_dlm.generate" and module.main
