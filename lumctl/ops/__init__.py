"""Numba kernels, each beside a plain NumPy/Python reference twin (tests compare them)."""
