"""What a benchmark ran on: platform, cores, MLX version and backend, BLAS."""

from __future__ import annotations

import os
import platform

import mlx.core as mx

from mlx_dlm import blas


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
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "backend": backend(),
        "blas": blas.status,
    }


def describe(info: dict) -> str:
    """One line naming the machine."""
    return (f"{info['platform']}, {info['cores']} cores, mlx {info['mlx']} ({info['backend']} backend), "
            f"BLAS {info['blas']}")
