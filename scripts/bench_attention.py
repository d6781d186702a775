"""Paged-attention kernels against their peers, on the GPU they will run on.

    python -m ziggurat.scripts.bench_attention [--sweep] [--json out.json]

prefill: one causal 4096-token sequence (Llama-3.1-8B heads: 32 q, 8 kv, dim 128,
  bf16, 16-token pages) through kernels.attention_triton.paged_prefill, next to
  torch's scaled_dot_product_attention (FlashAttention backend) on the same
  q/k/v laid out dense; TFLOP/s counts the causal half of QK^T and PV.
  --sweep tries launch shapes (block_m, tile, warps, stages) and prints the best.
decode: paged_decode for batch x context, next to the bytes of K and V it must
  read at the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from ziggurat.scripts.report import emit


def bench(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def paged(seq_lens, q_lens, hkv=8, g=4, d=128, bs=16, dtype=torch.bfloat16):
    """Random q and paged caches holding each sequence's context in shuffled pages."""
    dev = "cuda"
    nblocks = sum((L + bs - 1) // bs for L in seq_lens)
    perm = torch.randperm(nblocks, device=dev).to(torch.int32)
    width = max((L + bs - 1) // bs for L in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=dev)
    at = 0
    for i, L in enumerate(seq_lens):
        n = (L + bs - 1) // bs
        tables[i, :n] = perm[at : at + n]
        at += n
    kc = torch.randn(nblocks, bs, hkv, d, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(sum(q_lens), hkv * g, d, device=dev, dtype=dtype)
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.long, device=dev)
    lens = torch.tensor(seq_lens, dtype=torch.long, device=dev)
    return q, kc, vc, tables, lens, qsl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from ziggurat.kernels import attention_triton as AT

    res = {"bench": "attention", "machine": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    n, hq, hkv, d = args.n, 32, 8, 128
    flops = 2 * 2 * hq * d * n * n / 2  # QK^T and PV, causal half
    q, kc, vc, tables, lens, qsl = paged([n], [n])
    scale = d**-0.5

    def ours(**kw):
        # The work list as the engine plans it: once a step, outside the timed kernel.
        bm = AT.prefill_block_m(q, kc.shape[1], kw.get("block_m"))
        work = torch.from_numpy(AT.prefill_work([0, n], bm)).cuda()
        return lambda: AT.paged_prefill(q, kc, vc, tables, lens, qsl, n, scale, work=work, **kw)

    t = bench(ours())
    res["prefill_tflop_s"] = flops / t / 1e12
    # Peer: SDPA on dense [1, H, n, D] (GQA expanded), FlashAttention backend.
    k_dense = kc[tables[0].long()].reshape(-1, hkv, d)[:n].transpose(0, 1).repeat_interleave(hq // hkv, 0)[None]
    v_dense = vc[tables[0].long()].reshape(-1, hkv, d)[:n].transpose(0, 1).repeat_interleave(hq // hkv, 0)[None]
    q_dense = q.transpose(0, 1)[None]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q_dense, k_dense, v_dense,
                                                                                is_causal=True))
    res["sdpa_flash_tflop_s"] = flops / t_sdpa / 1e12
    # What the engine runs for a fresh prompt: SDPA on the step's dense k/v,
    # per backend, at a length seen before (steady) and at new lengths (first
    # call per length: cuDNN builds a plan per shape).
    from torch.nn.attention import SDPBackend

    from ziggurat.kernels.attention import _sdpa_causal

    k_step = kc[tables[0].long()].reshape(-1, hkv, d)[:n]
    v_step = vc[tables[0].long()].reshape(-1, hkv, d)[:n]
    res["fresh_prompt_sdpa"] = {}
    for name, backends in (("flash+efficient (engine)", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                           ("flash", [SDPBackend.FLASH_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION])):
        try:
            steady = bench(lambda: _sdpa_causal(q, k_step, v_step, scale, backends))
            firsts = []
            for m in (n - 17, n - 33, n - 49):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _sdpa_causal(q[:m], k_step[:m], v_step[:m], scale, backends)
                torch.cuda.synchronize()
                firsts.append(time.perf_counter() - t0)
        except RuntimeError as e:
            print(f"  fresh-prompt SDPA {name}: {type(e).__name__}: {str(e)[:80]}")
            continue
        res["fresh_prompt_sdpa"][name] = {"tflop_s": flops / steady / 1e12, "first_call_new_len_ms":
                                          statistics.median(firsts) * 1e3}
        print(f"  fresh-prompt SDPA {name}: {steady * 1e3:.2f} ms = {flops / steady / 1e12:.0f} TFLOP/s; "
              f"first call at a new length {statistics.median(firsts) * 1e3:.1f} ms", flush=True)
    print(f"prefill {n}: paged kernel {t * 1e3:.2f} ms = {res['prefill_tflop_s']:.0f} TFLOP/s; "
          f"SDPA flash (GQA expanded) {t_sdpa * 1e3:.2f} ms = {res['sdpa_flash_tflop_s']:.0f} TFLOP/s", flush=True)
    if args.sweep:
        best = []
        for bm, tile, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)):
            try:
                tt = bench(ours(block_m=bm, pages_per_tile=tile // 16, num_warps=w, num_stages=st), reps=5)
            except Exception as e:  # out of shared memory and the like
                print(f"  block_m={bm} tile={tile} warps={w} stages={st}: {type(e).__name__}")
                continue
            best.append((tt, bm, tile, w, st))
            print(f"  block_m={bm} tile={tile} warps={w} stages={st}: {flops / tt / 1e12:.0f} TFLOP/s", flush=True)
        best.sort()
        tt, bm, tile, w, st = best[0]
        res["prefill_best"] = {"block_m": bm, "tile": tile, "num_warps": w, "num_stages": st,
                               "tflop_s": flops / tt / 1e12}
        print(f"best: {res['prefill_best']}")

    # Decode: bytes of K and V read vs the copy bandwidth.
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    bw = 2 * a.numel() * 2 / bench(lambda: a.clone(), reps=5)
    del a
    res["bandwidth_gb_s"] = bw / 1e9
    res["decode"] = {}
    for batch, ctx in ((1, 640), (1, 4096), (32, 4096), (128, 1024), (128, 2048)):
        q, kc, vc, tables, lens, _ = paged([ctx] * batch, [1] * batch)
        t = bench(lambda: AT.paged_decode(q, kc, vc, tables, lens, ctx, scale))
        byts = 2 * batch * ctx * hkv * d * 2
        res["decode"][f"{batch}x{ctx}"] = {"us": t * 1e6, "fraction_of_bandwidth": byts / t / bw}
        print(f"decode batch {batch} x ctx {ctx}: {t * 1e6:.1f} us, {byts / t / 1e9:.0f} GB/s "
              f"= {byts / t / bw:.0%} of copy bandwidth", flush=True)
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
