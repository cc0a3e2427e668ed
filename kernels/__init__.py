"""Triton kernels of nern_fast, installed as the subpackage ``nern_fast.kernels``.

Kernels only: no nn.Module and no training code. Importing this package needs triton; the ops layer
(``nern_fast.ops.triton_backend``) imports it lazily so nern_fast works without triton.
"""
