"""Test and benchmark support, not library API: nothing in `vqgan_jax` imports it, and its
names may change without notice.

`reference` drives the original PyTorch implementation (the `[reference]` extra) as the
oracle of the parity tests, the converter's tests and the side-by-side benchmarks.
"""
