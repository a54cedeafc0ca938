"""The OpenBLAS switch: same numbers with and without it, loaded when it should be, clear warnings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_dlm import blas

PROBE = """
import json, sys
{pre}
import mlx_dlm
import mlx.core as mx
import numpy as np
a = np.load(sys.argv[1]); b = np.load(sys.argv[2])
c = np.array(mx.array(a) @ mx.array(b))
np.save(sys.argv[3], c)
maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
print(json.dumps({{"status": mlx_dlm.blas_in_use(), "openblas_mapped": "libopenblas" in maps}}))
"""


def _run(tmp_path, env_value=None, pre=""):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 257), dtype=np.float32), rng.standard_normal((257, 129), dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    env = {k: v for k, v in os.environ.items() if k != blas.ENV_VAR}
    if env_value is not None:
        env[blas.ENV_VAR] = env_value
    out = tmp_path / f"c{abs(hash((env_value, pre)))}.npy"
    proc = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre), str(tmp_path / "a.npy"),
                           str(tmp_path / "b.npy"), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), np.load(out), a.astype(np.float64) @ b.astype(np.float64), proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or blas.find_openblas() is None,
                    reason="needs Linux with an OpenBLAS installed")
def test_switch_loads_openblas_and_matches_reference_blas(tmp_path):
    on, c_on, want, err_on = _run(tmp_path)
    off, c_off, _, err_off = _run(tmp_path, "0")
    assert on["status"].startswith("openblas:") and on["openblas_mapped"]
    assert off["status"] == "disabled" and not off["openblas_mapped"]
    assert err_on == "" and err_off == ""  # nothing to warn about
    np.testing.assert_allclose(c_on, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(c_off, want, rtol=1e-4, atol=1e-4)
    # Same numbers up to float32 summation order (relative to the size of the entries).
    assert np.abs(c_on - c_off).max() <= 1e-6 * np.abs(want).max() * np.sqrt(257)  # 257 = inner dimension


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the switch only acts on Linux")
def test_warns_once_when_only_reference_blas(tmp_path):
    info, c, want, err = _run(tmp_path, "/nonexistent/libopenblas.so.0")
    assert info["status"] == "reference"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "apt-get install libopenblas0-pthread" in lines[0]
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the switch only acts on Linux")
def test_too_late_when_mlx_imported_first(tmp_path):
    info, _, _, err = _run(tmp_path, pre="import mlx.core")
    assert info["status"] == "too-late" and not info["openblas_mapped"]
    assert "import mlx_dlm first" in err
