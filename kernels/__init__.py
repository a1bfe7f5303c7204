"""Compute kernels of lit-hsa: each op has a PyTorch reference and (where it pays) a Triton kernel."""
