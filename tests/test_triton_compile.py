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
import re
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
                 "tab_ptr": "fp32", "scr_ptr": "fp32", "scr32_ptr": "fp32", "part_ptr": "fp32",
                 "src_ptr": "fp32", "dst_ptr": "fp32", "wht_ptr": "fp32", "wlt_ptr": "fp32"}
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
    # large kernels: capped forward tiles (k = 5: 64 rows, k = 7: 32), 16-row backward tiles over 8 warps
    ("fwd-h280-tf32-k7-maxcrop", "fwd", 280, "tf32", 7, True, True, True, False, False),
    ("bwd-h280-tf32-k5-maxcrop", "bwd", 280, "tf32", 5, True, True, True, False, False),
    ("bwd-h280-bf16-k7-maxcrop", "bwd", 280, "bf16", 7, True, True, True, False, False),
    ("bwd-h280-fp32-k5-maxcrop", "bwd", 280, "fp32", 5, True, True, True, False, False),
    ("bwd-h180-fp32-k7-maxcrop-subset", "bwd", 180, "fp32", 7, True, True, True, True, False),
]
# On-demand layer decodes (a 4,096-row subset, ResNet-56's H): the narrow row tiles the tuner also
# times for small forwards (triton_tuner.SMALL_CALL_ROWS), compiled beside the defaults above.
SMALL_CALLS = [("fwd-layer-h280-tf32", 280, "tf32"), ("fwd-layer-h280-bf16", 280, "bf16")]


def _compile(kernel, constexprs: dict, bf16: bool, num_warps: int, num_stages: int,
             pointer_types: dict | None = None, ones: tuple = (), divisible: tuple = (),
             descriptors: dict | None = None) -> dict:
    """Compile for sm_90 and read the cubin's resource usage. ``pointer_types`` overrides the element
    type of pointer arguments by name; integer arguments named in ``ones`` are specialised to 1 and
    those in ``divisible`` marked as multiples of 16 — what triton does at a launch that passes such
    values (a unit stride, padded sizes). ``descriptors``: TMA descriptor arguments by name ->
    (element type, block shape)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif descriptors and p.name in descriptors:
            kind, block = descriptors[p.name]
            signature[p.name] = f"tensordesc<{kind}[{','.join(map(str, block))}]>"
        elif p.name in ones:
            signature[p.name] = "constexpr"
            constexprs[p.name] = 1
        elif p.name.endswith("_ptr"):
            kind = (pointer_types or {}).get(p.name) or (
                "bf16" if bf16 and p.name in BF16_POINTERS else POINTER_TYPES[p.name])
            signature[p.name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "i32"
            if p.name in MULTIPLES_OF_16 or p.name in divisible:
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
    ptx = compiled.asm["ptx"]
    # 4-byte asynchronous copies: operands staged element by element (a tf32 operand that is not
    # K-major goes into transposed shared memory that way)
    narrow = len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x4\b", ptx))
    return {"registers": int(fields.get("REG", -1)), "spill_bytes": int(fields.get("STACK", -1)),
            "shared_bytes": int(compiled.metadata.shared), "wgmma": "wgmma.mma_async" in ptx,
            "async_copy": "cp.async" in ptx, "narrow_copies": narrow,
            "tma": "cp.async.bulk.tensor" in ptx}


def _shape(tb, hidden: int, precision: str, **kw):
    base = dict(rows=1 << 20, subset=False, hidden=hidden, num_hidden=3, enc_size=240, levels=40,
                kernel_size=3, ffn=False, permuted=False, crop=False, has_max=False, precision=precision,
                f64=False, num_layers=16, num_filters=4800, num_channels=4800)
    base.update(kw)
    return tb.DecodeShape(**base)


def _chunked_report(tb) -> list[dict]:
    """Every chunked kernel with every candidate configuration the tuner may pick (H = 1256; tf32, bf16;
    fp32 and fp32x3 defaults): the GEMMs in each role they are launched in."""
    from nern_fast.kernels import decode_chunked as kc
    from nern_fast.ops import triton_chunked as tc
    from nern_fast.ops.triton_inputs import PRECISION_CODES

    rows = []
    fp32 = {"a_ptr": "fp32", "w_ptr": "fp32", "b_ptr": "fp32", "h_ptr": "fp32", "y_ptr": "fp32"}
    for precision in ("tf32", "bf16", "fp32", "fp32x3"):
        act = "bf16" if precision == "bf16" else "fp32"
        shape = _shape(tb, 1256, precision)
        code = PRECISION_CODES[precision]
        for kind in ("fwd", "bwd"):
            for config in tb.candidate_configs(kind, shape, "auto", "chunked"):
                tiles = dict(PRECISION=code, INTERPRET=False, F64=False, BM=config.bm, BN=config.bn,
                             GROUP_M=8)
                launch = (config.num_warps, config.num_stages)
                # (role, pointer types, constexprs, unit-stride argument, multiples of 16): at H = 1256
                # K, N_S and the strides are padded (H_S = 1264, E_S = 240, K2P = 16); K_W is padded in
                # the forward but the true H (1256) or k² (9) in the backward; N_W = H forward.
                fwd_div = ("M", "K", "K_W", "N_S", "stride_wn")
                roles = [("hidden", {**fp32, "a_ptr": act, "w_ptr": act, "y_ptr": act},
                          dict(EPILOGUE=0, ROUND_A=False, BK=config.bk), "stride_wk", fwd_div),
                         ("first-direct", {**fp32, "a_ptr": act, "y_ptr": act},
                          dict(EPILOGUE=0, ROUND_A=False, BK=config.bk), "stride_wk", fwd_div)]
                if kind == "bwd":
                    # as stored: W's rows are the reduction (unit stride_wn); K-major: Wᵀ (unit
                    # stride_wk)
                    km = config.k_major
                    bwd_div = ("M", "K", "N_W", "N_S", "stride_wn" if km else "stride_wk") + (
                        ("K_W",) if km else ())  # K-major: the transposed weights' padded K
                    unit = "stride_wk" if km else "stride_wn"
                    roles = [("input-grad", {**fp32, "a_ptr": act, "w_ptr": act, "h_ptr": act, "y_ptr": act},
                              dict(EPILOGUE=1, ROUND_A=False, BK=config.bk), unit, bwd_div),
                             ("last-input-grad", {**fp32, "h_ptr": act, "y_ptr": act},
                              dict(EPILOGUE=1, ROUND_A=True, BK=16), unit, bwd_div)]
                suffix = "-kmajor" if config.k_major else ""
                if kind == "fwd" and precision in ("tf32", "bf16"):  # the TMA candidates (Hopper)
                    for role, w_kind in (("hidden", act), ("first-direct", "fp32")):
                        usage = _compile(kc.chunk_matmul_tma_kernel,
                                         dict(PRECISION=code, INTERPRET=False, BM=config.bm, BN=config.bn,
                                              BK=config.bk, GROUP_M=8), False, *launch,
                                         pointer_types={"b_ptr": "fp32"},
                                         descriptors={"a_desc": (act, (config.bm, config.bk)),
                                                      "w_desc": (w_kind, (config.bn, config.bk)),
                                                      "y_desc": (act, (config.bm, config.bn))},
                                         divisible=("M", "K", "N_S"))
                        rows.append({"call": f"chunk-matmul-tma-{role}-{precision}",
                                     "config": config.describe() + " tma", **usage})
                for role, types, extra, unit, div in roles:
                    usage = _compile(kc.chunk_matmul_kernel, {**tiles, **extra}, False, *launch,
                                     pointer_types=types, ones=(unit,), divisible=div)
                    rows.append({"call": f"chunk-matmul-{role}-{precision}{suffix}",
                                 "config": config.describe(), **usage})
                if kind == "bwd":
                    bn, bk, br = tc.weight_grad_tiles(config)
                    for role, d_type, x_type, n in (("hidden", act, act, bn), ("last", "fp32", act, 16)):
                        usage = _compile(kc.chunk_weight_grad_kernel,
                                         dict(ROUND_D=role == "last", TRANSPOSED=config.k_major, PRECISION=code,
                                              INTERPRET=False, F64=False, BN=n, BK=bk, BR=br), False, *launch,
                                         pointer_types={"d_ptr": d_type, "x_ptr": x_type, "part_ptr": "fp32"},
                                         divisible=("N_S", "K_X", "M", "seg_rows", "w_off", "b_off", "LD"))
                        rows.append({"call": f"chunk-weight-grad-{role}-{precision}{suffix}",
                                     "config": f"BN={n} BK={bk} BR={br} warps={launch[0]} stages={launch[1]}",
                                     **usage})
    # The row kernels (4 warps, one configuration each), bf16 activations, every option on.
    row = dict(K=5, K2P=32, SUBSET=True, PERMUTED=True, CROP=True, PRECISION=2, INTERPRET=False, F64=False,
               BM=tc.row_tile())
    bf16_x = {"x_ptr": "bf16", "raw_ptr": "fp32", "g_ptr": "fp32", "act_ptr": "bf16", "enc_out_ptr": "bf16"}
    for name, kernel, extra in (("chunk-out", kc.chunk_out_kernel, dict(BK=64)),
                                ("chunk-out-grad-max", kc.chunk_out_grad_kernel, dict(BK=64, HAS_MAX=True)),
                                ("chunk-first-layer", kc.chunk_first_layer_kernel, dict(BS=64)),
                                ("chunk-encoding-ffn", kc.chunk_encoding_kernel, dict(BK=32, FFN=True))):
        usage = _compile(kernel, {**row, **extra}, False, 4, 2, pointer_types=bf16_x,
                         divisible=("tile0", "R"))
        rows.append({"call": name, "config": f"BM={tc.row_tile()} warps=4", **usage})
    for dtype in ("fp32", "bf16"):
        usage = _compile(kc.chunk_transpose_kernel, dict(BM=64, BN=64), False, 4, 2,
                         pointer_types={"src_ptr": dtype, "dst_ptr": dtype}, divisible=("N_S", "LD"))
        rows.append({"call": f"chunk-transpose-{dtype}", "config": "BM=64 BN=64 warps=4", **usage})
    return rows


def report() -> list[dict]:
    """Compile every call of CALLS with its default configuration; one dict per kernel."""
    from nern_fast.kernels import decode_bwd, decode_fwd
    from nern_fast.ops import triton_backend as tb
    from nern_fast.ops import triton_fused as tb_fused

    rows = []
    for name, kind, hidden, precision, k, crop, has_max, permuted, subset, ffn in CALLS:
        shape = tb.DecodeShape(rows=1 << 20, subset=subset, hidden=hidden, num_hidden=3, enc_size=240,
                               levels=40, kernel_size=k, ffn=ffn, permuted=permuted, crop=crop,
                               has_max=has_max, precision=precision, f64=False, num_layers=16,
                               num_filters=4800, num_channels=4800)
        configs = tb.candidate_configs(kind, shape, "auto", "fused")
        # the default; for the tf32 backward also its K-major variant
        variants = [configs[0]] + [c for c in configs[1:2] if c.k_major != configs[0].k_major]
        for config in variants:
            meta = tb_fused.constexprs(shape, config)
            warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
            if kind == "fwd":
                kernel = decode_fwd.decode_fwd_kernel
            else:
                kernel = decode_bwd.decode_bwd_kernel
                meta.update(HAS_MAX=has_max, ATOMIC=False, K_MAJOR=config.k_major)
            usage = _compile(kernel, meta, precision == "bf16", warps, stages)
            suffix = "-kmajor" if config.k_major else ""
            rows.append({"call": name + suffix, "config": config.describe(), **usage})
    for name, hidden, precision in SMALL_CALLS:
        shape = tb.DecodeShape(rows=4096, subset=True, hidden=hidden, num_hidden=3, enc_size=240, levels=40,
                               kernel_size=3, ffn=False, permuted=False, crop=False, has_max=False,
                               precision=precision, f64=False, num_layers=55, num_filters=2032,
                               num_channels=2032)
        for config in tb.candidate_configs("fwd", shape, "auto", "fused", True):
            if config.bm <= 32:
                meta = tb_fused.constexprs(shape, config)
                warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
                usage = _compile(decode_fwd.decode_fwd_kernel, meta, precision == "bf16", warps, stages)
                rows.append({"call": f"{name}-bm{config.bm}", "config": config.describe(), **usage})
    table_meta = dict(PRECISION=2, INTERPRET=False, F64=False, BT=64, BN=64, BK=32)
    rows.append({"call": "first_layer_tables", "config": "bf16",
                 **_compile(decode_fwd.first_layer_tables_kernel, table_meta, False, 4, 2)})
    rows.append({"call": "reduce_partials", "config": "",
                 **_compile(decode_bwd.reduce_partials_kernel, {"BLOCK": 1024}, False, 4, 2)})
    return rows + _chunked_report(tb)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA tests run the kernels")
def test_kernels_compile_for_sm90_within_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NERN_FAST_TRITON_K_MAJOR"] = "1"  # the opt-in K-major backward candidates are compiled too
    done = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        assert row["shared_bytes"] <= SM90_MAX_SHARED, row
        # bytes per thread: a few dozen in the forward, a few hundred in the max-crop backward (triton
        # 3.8: 32 / 400; triton 3.6 allocates a little worse: 80 / 528). Huge tiles spill kilobytes.
        limit = 128 if row["call"].startswith("fwd") else 640
        if row["call"].startswith("chunk-matmul") or row["call"].startswith("chunk-weight-grad"):
            limit = 0  # plain GEMM tiles: no spills at all
        assert 0 <= row["spill_bytes"] <= limit, row
        if row["call"].startswith("chunk-matmul-hidden-") and not row["call"].endswith(("-fp32", "-fp32x3")):
            # the large-H schedule's reason to exist: Hopper tensor-core GEMMs with staged operands
            assert row["wgmma"] and row["async_copy"], row
        if row["call"].startswith("chunk-matmul-tma-"):  # tiles moved by the TMA, tensor-core products
            assert row["tma"] and row["wgmma"], row
        if row["call"].endswith("-kmajor") or row["call"].startswith("chunk-matmul-hidden-"):
            # K-major operands: staged with wide copies, none element by element
            assert row["narrow_copies"] == 0, row
    assert {r["call"] for r in rows} >= {f"{name}-bm{bm}" for name, _, _ in SMALL_CALLS for bm in (16, 32)}
    kmajor = [r for r in rows if r["call"].endswith("-kmajor")]
    assert {r["call"] for r in kmajor} >= {"chunk-weight-grad-hidden-tf32-kmajor",
                                           "chunk-matmul-input-grad-tf32-kmajor"}
    assert any(r["narrow_copies"] > 0 for r in rows if r["call"] == "chunk-weight-grad-hidden-tf32"), \
        "the operands as stored no longer take 4-byte copies: the K-major variant may be unnecessary"


if __name__ == "__main__":
    result = report()
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        for r in result:
            flags = ("wgmma " if r["wgmma"] else "") + ("tma" if r["tma"] else "cp.async" if r["async_copy"] else "")
            narrow = f"4-byte copies {r['narrow_copies']:>3}" if r["narrow_copies"] else ""
            print(f"{r['call']:<44} regs {r['registers']:>3}  spill {r['spill_bytes']:>4} B  "
                  f"shared {r['shared_bytes'] / 1024:6.1f} KiB  {flags:<15} {narrow:<18} {r['config']}")
