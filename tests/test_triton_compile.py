"""The Triton kernels compile for an H100 (sm_90) here, without a GPU, within its limits.

Runs in a subprocess without TRITON_INTERPRET (this test session imported triton in interpreter
mode), compiles the default launch configuration of representative calls with triton's bundled
ptxas and reads the resource usage of the cubins: shared memory within the 227 KiB a block may use
on sm_90, and register spills (local-memory stack) small. This catches what only a real GPU
compile sees (tl.dot shape rules, constexpr/global errors, dtype casts, spills from huge tiles).

Run as a script for the full table: ``python tests/test_triton_compile.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SM90_MAX_SHARED = 227 * 1024

# Pointer arguments by name -> element type (bf16 variants where the bf16 mode keeps bf16 buffers).
POINTER_TYPES = {"out_ptr": "fp32", "grad_ptr": "fp32", "rows_ptr": "i64", "koff_ptr": "i64",
                 "woff_ptr": "i64", "meta_ptr": "i32", "coord_ptr": "i64", "pos_l_ptr": "fp32",
                 "pos_f_ptr": "fp32", "pos_c_ptr": "fp32", "enc_ptr": "fp32", "w1_ptr": "fp32",
                 "b1_ptr": "fp32", "wh_ptr": "fp32", "bh_ptr": "fp32", "wl_ptr": "fp32", "bl_ptr": "fp32",
                 "tab_ptr": "fp32", "scr_ptr": "fp32", "scr32_ptr": "fp32", "part_ptr": "fp32"}
BF16_POINTERS = ("wh_ptr", "scr_ptr")
MULTIPLES_OF_16 = ("E_S", "H_S", "slot_size")  # the launcher pads these; triton specialises on it

# (name, kind, hidden, precision, kernel_size, crop, has_max, permuted, subset, ffn)
CALLS = [
    ("fwd-resnet18-h1256-tf32", "fwd", 1256, "tf32", 3, False, False, False, False, False),
    ("fwd-resnet18-h1256-bf16", "fwd", 1256, "bf16", 3, False, False, False, False, False),
    ("fwd-h180-fp32-crop-perm-subset-ffn", "fwd", 180, "fp32", 5, True, True, True, True, True),
    ("fwd-resnet56-h280-fp32x3", "fwd", 280, "fp32x3", 3, False, False, False, False, False),
    ("bwd-h1256-bf16", "bwd", 1256, "bf16", 3, False, False, False, False, False),
    ("bwd-h280-tf32-maxcrop", "bwd", 280, "tf32", 3, True, True, True, False, False),
    ("bwd-h180-fp32", "bwd", 180, "fp32", 3, False, False, False, False, False),
]


def _compile(kernel, constexprs: dict, bf16: bool, num_warps: int, num_stages: int) -> dict:
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            kind = "bf16" if bf16 and p.name in BF16_POINTERS else POINTER_TYPES[p.name]
            signature[p.name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "i32"
            if p.name in MULTIPLES_OF_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(item.split(":") for item in usage.split() if item.count(":") == 1 and item[0].isupper())
    return {"registers": int(fields.get("REG", -1)), "spill_bytes": int(fields.get("STACK", -1)),
            "shared_bytes": int(compiled.metadata.shared)}


def report() -> list[dict]:
    """Compile every call of CALLS with its default configuration; one dict per kernel."""
    from nern_fast.kernels import decode_bwd, decode_fwd
    from nern_fast.ops import triton_backend as tb

    rows = []
    for name, kind, hidden, precision, k, crop, has_max, permuted, subset, ffn in CALLS:
        shape = tb.DecodeShape(rows=1 << 20, subset=subset, hidden=hidden, num_hidden=3, enc_size=240,
                               levels=40, kernel_size=k, ffn=ffn, permuted=permuted, crop=crop,
                               has_max=has_max, precision=precision, f64=False, num_layers=16,
                               num_filters=4800, num_channels=4800)
        config = tb.candidate_configs(kind, shape)[0]
        meta = tb._constexprs(shape, config)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        kernel = decode_fwd.decode_fwd_kernel if kind == "fwd" else decode_bwd.decode_bwd_kernel
        meta.update(HAS_MAX=has_max, ATOMIC=False)
        usage = _compile(kernel, meta, precision == "bf16", warps, stages)
        rows.append({"call": name, "config": config.describe(), **usage})
    table_meta = dict(PRECISION=2, INTERPRET=False, F64=False, BT=64, BN=64, BK=32)
    rows.append({"call": "first_layer_tables", "config": "bf16",
                 **_compile(decode_fwd.first_layer_tables_kernel, table_meta, False, 4, 2)})
    rows.append({"call": "reduce_partials", "config": "",
                 **_compile(decode_bwd.reduce_partials_kernel, {"BLOCK": 1024}, False, 4, 2)})
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA tests run the kernels")
def test_kernels_compile_for_sm90_within_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        assert row["shared_bytes"] <= SM90_MAX_SHARED, row
        limit = 64 if row["call"].startswith("fwd") else 512  # bytes per thread
        assert 0 <= row["spill_bytes"] <= limit, row


if __name__ == "__main__":
    result = report()
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        for r in result:
            print(f"{r['call']:<36} regs {r['registers']:>3}  spill {r['spill_bytes']:>4} B  "
                  f"shared {r['shared_bytes'] / 1024:6.1f} KiB  {r['config']}")
