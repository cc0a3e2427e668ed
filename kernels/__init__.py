"""Triton kernels of nern_fast, installed as the subpackage ``nern_fast.kernels``.

Kernels only: no nn.Module and no training code. ``decode_fwd`` (separable first-layer tables and
the fused forward decode), ``decode_bwd`` (fused backward and the deterministic reduction of
per-program gradient partials), ``common`` (device functions they share); the design is in
README.md beside this file. Importing this package needs triton; the ops layer
(``nern_fast.ops.triton_backend``) imports it so nern_fast works without triton.
"""
