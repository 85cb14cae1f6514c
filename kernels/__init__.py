"""Triton kernels for the RL math, with PyTorch references (import name: megatron_recycle_kernels)."""
