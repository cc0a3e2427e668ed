"""Triton kernels of nern_fast, installed as the subpackage ``nern_fast.kernels``.

Kernels only: no nn.Module and no training code. ``decode_fwd`` (separable first-layer tables and
the fused forward decode), ``decode_bwd`` (fused backward and the deterministic reduction of
gradient partials), ``decode_chunked`` (the chunked schedule for large hidden sizes: per chunk of
rows one GEMM launch per layer, forward and backward), ``common`` (device functions they share);
the design is in README.md beside this file. Importing this package needs triton; the ops layer
(``nern_fast.ops.triton_backend``) imports it so nern_fast works without triton.
"""
