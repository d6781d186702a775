"""The model's logits against HF transformers on the same checkpoint, dtype and GPU.

    python -m ziggurat.scripts.check_logits --model /tmp/llama8b [--dtype bfloat16] [--json out.json]

Runs a few prompts of different lengths through the engine's own forward
(the worker's model with its paged KV cache and kernels, as a prefill) and
through `transformers`, and compares the logits of every position: relative
error ||ours - hf|| / ||hf|| over the [T, V] block, the largest absolute
difference, and how often the argmax agrees. In bf16 both sides round
differently (fused kernels, GEMV vs GEMM), so below fp32 the check is
against the fp32 truth: HF run in fp32 on the same inputs; our bf16 logits
must be no further from it than 1.5x HF's own bf16 logits are (the bf16
noise floor of this model). In fp32 the check is rel err < --tol. The last
position's greedy token and top-5 are printed for a human look.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from ziggurat.scripts.report import emit


def prefill_logits(runner, ids: list[int]):
    """Every position's logits of one prompt, prefilled into blocks 0.. (nothing else may run on the engine)."""
    import torch

    from ziggurat.kernels.attention import AttentionMetadata

    dev, bs, n = runner.device, runner.block_size, len(ids)
    pos = torch.arange(n, device=dev)
    meta = AttentionMetadata(
        slot_mapping=pos.clone(), query_start_loc=torch.tensor([0, n], device=dev),
        seq_lens=torch.tensor([n], device=dev),
        block_tables=torch.arange((n + bs - 1) // bs, dtype=torch.int32, device=dev).unsqueeze(0),
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n)
    with torch.inference_mode():
        return runner.model.compute_logits(runner.model(torch.tensor(ids, device=dev), pos, meta)).float().cpu()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--make", metavar="ARCH:PRESET")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[7, 130, 1000])
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    import transformers

    from ziggurat import LLM
    from ziggurat.kernels.attention import AttentionMetadata

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.make:
        from ziggurat.models.maker import make_model

        arch, preset = args.make.split(":")
        args.model = str(make_model(tempfile.mkdtemp(prefix="check-logits-"), arch=arch, preset=preset,
                                    dtype=args.dtype, device=dev, max_shard_bytes="5GB"))
    kw = {"gpu_memory_utilization": 0.45} if dev == "cuda" else {"num_kv_blocks": 256}
    llm = LLM(args.model, dtype=args.dtype, max_model_len=max(args.lengths) + 16, **kw)
    runner = llm.engine.executor.worker.runner
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(vocab, 8000), (n,), generator=g).tolist() for n in args.lengths]
    ours = []
    bs = runner.block_size
    with torch.inference_mode():
        for p in prompts:  # a fresh prefill into blocks 0.. (nothing else runs on this engine)
            n = len(p)
            full = prefill_logits(runner, p)
            # The last token again as a one-row decode step (GEMV and split-K
            # decode kernels) over the KV the prefill just wrote.
            one = torch.tensor([n - 1], device=dev)
            dmeta = AttentionMetadata(
                slot_mapping=one.clone(), query_start_loc=torch.tensor([0, 1], device=dev),
                seq_lens=torch.tensor([n], device=dev),
                block_tables=torch.arange((n + bs - 1) // bs, dtype=torch.int32, device=dev).unsqueeze(0),
                query_start_loc_cpu=[0, 1], seq_lens_cpu=[n], max_query_len=1, max_seq_len=n)
            h1 = runner.model(torch.tensor(p[-1:], device=dev), one, dmeta)
            ours.append((full, runner.model.compute_logits(h1).float().cpu()[0]))
    llm.shutdown()
    del llm, runner
    if dev == "cuda":
        torch.cuda.empty_cache()
    def hf_logits(dtype):
        m = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
        out = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=dev)
                out.append(m(ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu())
        del m
        if dev == "cuda":
            torch.cuda.empty_cache()
        return out

    hf_same = hf_logits(getattr(torch, args.dtype))
    # fp32 ground truth: the bf16 noise floor is how far HF's own bf16 run is from it.
    truth = hf_logits(torch.float32) if args.dtype != "float32" else None
    res = {"bench": "check-logits", "model": args.model, "dtype": args.dtype, "tol": args.tol,
           "machine": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "prompts": []}
    ok = True
    with torch.inference_mode():
        for k, (p, (a, dec)) in enumerate(zip(prompts, ours)):
            b = hf_same[k][:, : a.shape[1]]
            rel = ((a - b).norm() / b.norm()).item()
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            drel = ((dec - b[-1]).norm() / b[-1].norm()).item()
            row = {"len": len(p), "rel_err": rel, "max_abs_diff": (a - b).abs().max().item(),
                   "argmax_agreement": agree, "decode_rel_err": drel, "decode_argmax_equal": bool(
                       dec.argmax() == b[-1].argmax()), "nan": bool(torch.isnan(a).any() or torch.isnan(dec).any())}
            if truth is not None:
                t = truth[k][:, : a.shape[1]]
                row["ours_vs_fp32"] = ((a - t).norm() / t.norm()).item()
                row["hf_vs_fp32"] = ((b - t).norm() / t.norm()).item()
                row["decode_vs_fp32"] = ((dec - t[-1]).norm() / t[-1].norm()).item()
                extra = (f"          against HF fp32: ours {row['ours_vs_fp32']:.2e} (decode step "
                         f"{row['decode_vs_fp32']:.2e}), HF {args.dtype} {row['hf_vs_fp32']:.2e}")
                # Within bf16 tolerance: no further from the fp32 truth than HF's own run, with 50% slack.
                ok_row = row["ours_vs_fp32"] <= 1.5 * row["hf_vs_fp32"] and row["decode_vs_fp32"] <= 1.5 * row["hf_vs_fp32"]
            else:
                ok_row, extra = rel < args.tol and drel < args.tol, ""
            res["prompts"].append(row)
            ok &= ok_row and not row["nan"]
            print(f"len {len(p):5}: rel err {rel:.2e}, max |diff| {row['max_abs_diff']:.3f} "
                  f"(logit scale {b.abs().max().item():.2f}), argmax agrees at {agree:.1%} of positions; "
                  f"last token as a decode step: rel err {drel:.2e}, argmax {'=' if row['decode_argmax_equal'] else '!='}; "
                  f"last top-5 ours {a[-1].topk(5).indices.tolist()} hf {b[-1].topk(5).indices.tolist()}", flush=True)
            if extra:
                print(extra, flush=True)
    res["pass"] = ok
    print(f"{'PASS' if ok else 'FAIL'}: " + (f"every prompt at most 1.5x HF {args.dtype}'s distance from fp32"
                                             if args.dtype != "float32" else f"every prompt within rel err {args.tol}"))
    emit(res, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
