"""Checkpoints trained by the reference RANet (yangle15/RANet-pytorch), read without PyTorch.

``torch_file`` reads the files ``torch.save`` writes, ``mapping`` matches their tensors to the
port's variables, ``importing`` writes a ranet model directory from them.
"""
