"""mlx_dlm.convert: PyTorch checkpoints (simple_dlm, nanoGPT) -> mlx-dlm model directories.

torch is imported only here (extra `convert`); checkpoints are loaded with weights_only=True.
"""
