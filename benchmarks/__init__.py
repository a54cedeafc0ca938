"""mlx_dlm.benchmark: speed measurements (installed under mlx_dlm, run as `mlx_dlm.benchmark`)."""
