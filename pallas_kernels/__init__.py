"""Pallas kernels behind `sparse_attention.ops`, one folder per kernel family.

Kernels import nothing from `models` or `train`; each carries its own
`jax.custom_vjp` so models train through it.
"""
