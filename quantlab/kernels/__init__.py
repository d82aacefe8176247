"""Kernels for quantized matmuls: a teaching Triton kernel (``w4a16``) and ``QuantLinear``.

Importing this package does not import Triton; the first kernel launch does (see ``w4a16``).
"""
