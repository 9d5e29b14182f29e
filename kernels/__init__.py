"""Numba kernels (CPU and CUDA) used by tractoscale."""
