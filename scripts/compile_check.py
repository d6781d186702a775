"""Compile the Triton kernels for a GPU this machine does not have (default sm_90, the H100/H200),
with Triton's own ptxas: what would fail to compile there fails here, before a device call is spent
on it. Prints each variant's registers, stack (register spills) and shared memory.

    python -m ziggurat.scripts.compile_check [--arch 90] [--only fp8] [--json out.json]

The variants are the launches the engine makes at Llama-3.1-8B's shapes (head_dim 128, GQA 4, 16-token
blocks), with the 16-byte divisibility the JIT would specialize on: bf16 and FP8 weights, 16-bit and
FP8 KV caches. A kernel's real launch may pick other constexprs (the tables per GPU); these are the
defaults. Needs Triton's CUDA backend tools (ptxas, cuobjdump), which the triton wheel ships; no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ziggurat.scripts.report import emit

FLOATS = {"scale", "eps", "min_scale", "inv_t"}  # scalar arguments passed as Python floats


def variants():
    """(name, jit function, constexprs, pointer dtypes by argument (default *bf16), num_warps)."""
    from ziggurat.kernels import attention_triton as AT
    from ziggurat.kernels import elementwise_triton as ET
    from ziggurat.kernels import fp8_triton as FT
    from ziggurat.kernels import gemv_triton as GT

    f32 = {p: "*fp32" for p in ("acc_ptr", "ml_ptr", "ks_ptr", "vs_ptr", "s_ptr")}
    ints = {"tables_ptr": "*i32", "seq_lens_ptr": "*i32", "tickets_ptr": "*i32", "qsl_ptr": "*i64",
            "work_ptr": "*i32", "slots_ptr": "*i64", "pos_ptr": "*i64"}
    fp8_cache = {"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv"}
    decode = dict(G=4, G_PAD=16, D=128, D_PAD=128, BLOCK_SIZE=16, PAGES=4, NUM_SPLITS=8, USE_WINDOW=False,
                  PREC="tf32", EPILOGUE="ticket", G_MERGE=4, S_PAD=8, SPLIT_BLOCK=8)  # paged_decode's, 8 splits
    prefill = dict(G=4, D=128, D_PAD=128, BLOCK_M=64, BLOCK_SIZE=16, PAGES=4, USE_WINDOW=False, PREC="tf32")
    gemv = dict(HAS_BIAS=False, BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024)
    out = [
        ("decode, bf16 cache, fused merge", AT._decode_split_kernel, dict(decode, KV_SCALED=False), {**f32, **ints}, 4),
        ("decode, fp8 cache, fused merge", AT._decode_split_kernel, dict(decode, KV_SCALED=True),
         {**f32, **ints, **fp8_cache}, 4),
        ("decode, bf16 cache, 33 splits (long context)", AT._decode_split_kernel,
         dict(decode, KV_SCALED=False, NUM_SPLITS=33, S_PAD=64, SPLIT_BLOCK=16), {**f32, **ints}, 4),
        ("decode, bf16 cache, one split", AT._decode_split_kernel,
         dict(decode, KV_SCALED=False, NUM_SPLITS=1, EPILOGUE="direct", S_PAD=2, SPLIT_BLOCK=2), {**f32, **ints}, 4),
        ("prefill, bf16 cache", AT._prefill_kernel, dict(prefill, KV_SCALED=False), {**f32, **ints}, 4),
        ("prefill, fp8 cache", AT._prefill_kernel, dict(prefill, KV_SCALED=True), {**f32, **ints, **fp8_cache}, 4),
        ("store_kv, fp8 cache", ET._store_kv_kernel, dict(HD=1024, HD_PAD=1024, FP8=True),
         {**f32, **ints, "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv"}, 4),
        ("rotary + store_kv, fp8 cache", ET._rotary_store_kv_kernel,
         dict(HQ=32, HQ_PAD=32, HK=8, HK_PAD=8, HALF=64, HALF_PAD=64, FP8=True),
         {**f32, **ints, "cache_ptr": "*fp32", "kc_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv"}, 4),
        ("gemv, bf16 weights", GT._gemv_kernel, dict(gemv, HAS_SCALE=False, GATED=False), {}, 4),
        ("gemv, bf16 weights, gated (down)", GT._gemv_kernel, dict(gemv, HAS_SCALE=False, GATED=True), {}, 4),
        ("gemv, fp8 weights", GT._gemv_kernel, dict(gemv, HAS_SCALE=True, GATED=False),
         {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32"}, 4),
        ("gemv, fp8 weights, gated (down)", GT._gemv_kernel, dict(gemv, HAS_SCALE=True, GATED=True),
         {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32"}, 4),
        ("fp8 activation quantization, per token", FT._quant_kernel, dict(STATIC=False, BLOCK=1024, FMAX=448.0),
         {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "static_ptr": "*fp32"}, 4),
        ("fp8 activation quantization, static", FT._quant_kernel, dict(STATIC=True, BLOCK=1024, FMAX=448.0),
         {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "static_ptr": "*fp32"}, 4),
    ]
    return out


def compile_one(fn, consts: dict, ptrs: dict, num_warps: int, arch: int, cuobjdump: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    unknown = set(consts) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: no such constexpr argument(s) {sorted(unknown)}")
    args = [a for a in fn.arg_names if a not in consts]
    sig = {}
    for a in args:
        if a.endswith("_ptr") or a in ptrs:
            sig[a] = ptrs.get(a, "*bf16")
        else:
            sig[a] = "fp32" if a in FLOATS else "i32"
    sig.update({c: "constexpr" for c in consts})
    # What the JIT specializes on at these shapes: 16-byte aligned pointers, strides and widths divisible by 16.
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in args if sig[a] != "fp32"}
    t = time.perf_counter()
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps})
    secs = time.perf_counter() - t
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    res = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", usage))
    return {"regs": int(res.get("REG", -1)), "stack": int(res.get("STACK", 0)), "shared": int(res.get("SHARED", 0)),
            "compile_s": round(secs, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    ap.add_argument("--only", default="", help="variants whose name contains this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check: unset TRITON_INTERPRET (it compiles, it does not interpret)")
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        raise SystemExit(f"compile_check: {cuobjdump} is missing (Triton's CUDA backend tools)")
    rows, failed = [], 0
    for name, fn, consts, ptrs, warps in variants():
        if args.only not in name:
            continue
        try:
            r = {"variant": name, **compile_one(fn, consts, ptrs, warps, args.arch, cuobjdump)}
            print(f"{name:42s} regs {r['regs']:3d}  stack {r['stack']:4d} B  shared {r['shared']:6d} B  "
                  f"({r['compile_s']:.1f} s){'  SPILLS' if r['stack'] else ''}", flush=True)
        except Exception as e:  # report every variant, then fail
            failed += 1
            r = {"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            print(f"{name:42s} FAILED: {r['error']}", flush=True)
        rows.append(r)
    emit({"bench": "compile_check", "arch": f"sm_{args.arch}", "variants": rows, "failed": failed}, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
