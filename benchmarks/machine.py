"""What a benchmark ran on (platform, cores, MLX version and backend, BLAS), and writing its results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import time

import mlx.core as mx

from mlx_dlm import blas
from mlx_dlm.errors import UserError
from mlx_dlm.fileio import atomic_write_text


SETTLE_SECONDS = 0.1
DEFAULT_BLAS_THREADS = 1  # see add_blas_threads_flag


def settle() -> None:
    """Pause before a timed run that follows other work. OpenBLAS's worker threads spin for a while after a
    multi-threaded product, and on a 2-core machine the spinning slows whatever runs next: here an AR generation
    timed right after a DLM one took 1.7x as long as alone (311 against 183 ms); after this pause, as long (180)."""
    time.sleep(SETTLE_SECONDS)


def add_blas_threads_flag(parser) -> None:
    """--blas-threads: OpenBLAS's threads while a benchmark runs (Linux; where MLX has its own BLAS it does nothing).

    One by default: on the 2-core machine of the records, a second OpenBLAS thread competed with MLX's own thread
    and Python's, and batch-1 AR decoding ran at about half speed (3.0 against 1.4 ms a token) in some runs and not
    in others, at random, even a second after the last multi-threaded product; with one thread it became rare, the DLM's
    batch-1 rows ran as fast and its batch-8 rows 5% slower (docs/benchmarks.md, "Timing on this machine")."""
    parser.add_argument("--blas-threads", type=int, default=DEFAULT_BLAS_THREADS,
                        help="OpenBLAS threads while the benchmark runs (0: the library's own count); 1 keeps "
                             "batch-1 timings stable on a small machine")


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with OpenBLAS at n threads (0: unchanged); a UserError for a negative n."""
    if n < 0:
        raise UserError(f"--blas-threads must be 0 (OpenBLAS's own count) or more, got {n}")
    with blas.threads(n or None):
        yield


def backend() -> str:
    """"metal", "cuda" or "cpu": where MLX runs by default here."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def machine_info() -> dict:
    """A dict describing this machine for results files."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "backend": backend(),
        "blas": blas.status,
        "blas_threads": blas.get_threads(),  # None where MLX does not run on the OpenBLAS mlx_dlm loaded
        "cpu_compile": cpu_compile(),
    }


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor", "Apple M2"): two VMs of one kind can differ 3x in
    matmul rate and in the speed ratios they give. From cpuinfo on Linux, sysctl on macOS; else the platform's
    processor field, or "unknown"."""
    with contextlib.suppress(OSError), open(cpuinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip()
            if name:
                return name
    return platform.processor() or "unknown"


def cpu_compile() -> str:
    """What mx.compile can do on the CPU here: it fuses element-wise ops into C++ kernels that it builds with
    g++ at run time; without g++ it still simplifies the graph but fuses nothing."""
    if backend() != "cpu":
        return "n/a"
    return "fuses (g++ found)" if shutil.which("g++") else "no fusion (g++ not found)"


def describe(info: dict) -> str:
    """One line naming the machine."""
    cpu = f", {info['cpu']}" if info.get("cpu") else ""  # records from before it was kept have none
    return (f"{info['platform']}{cpu}, {info['cores']} cores, mlx {info['mlx']} ({info['backend']} backend), "
            f"BLAS {info['blas']}{_threads(info.get('blas_threads'))}, CPU compile: {info.get('cpu_compile', '?')}")


def _threads(n: int | None) -> str:
    return "" if n is None else f" at {n} thread{'s' if n != 1 else ''}"


def matmul_gflops(m: int = 4096, k: int = 1024, n: int = 1024, trials: int = 5) -> float:
    """This machine's attainable fp32 matmul rate (median of trials): the roofline for compute-bound rows."""
    import statistics
    import time

    a = mx.random.normal((m, k), key=mx.random.key(0))
    b = mx.random.normal((k, n), key=mx.random.key(1))
    mx.eval(a @ b)
    times = []
    for _ in range(trials):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return 2 * m * k * n / statistics.median(times) / 1e9


def write_results(path: str, results: dict) -> None:
    """Write a benchmark's results as indented JSON (atomically) and say so."""
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    print(f"Wrote {path}")
