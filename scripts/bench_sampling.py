"""The sampler on the GPU: the torch path (temperature, softmax, Exp(1) noise,
race) against the Triton path (kernels/sampling_triton.py: one pass), per
batch size and parameter mix, at Llama 3's vocabulary.

    python -m ziggurat.scripts.bench_sampling [--vocab 128256] [--batches 1 32 256]
"""

from __future__ import annotations

import argparse
import os
import sys

from ziggurat.scripts.report import emit

MIXES = {
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=0.8, top_k=50),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "half greedy": None,  # alternate rows greedy / temperature 0.8
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    import triton.testing

    from ziggurat.models.sampler import Sampler, SamplingBatch
    from ziggurat.sampling_params import SamplingParams

    res = {"bench": "sampling", "machine": torch.cuda.get_device_name(), "vocab": args.vocab, "rows": []}
    print(f"{'mix':<12}{'batch':>6}{'torch us':>10}{'triton us':>11}{'speedup':>9}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, kw in MIXES.items():
        for b in args.batches:
            params = ([SamplingParams(**kw)] * b if kw is not None else
                      [SamplingParams(temperature=0.8 if i % 2 else 0.0) for i in range(b)])
            logits = torch.randn(b, args.vocab, device="cuda", dtype=torch.bfloat16)
            batch = SamplingBatch.build(params, [[]] * b, [[]] * b, args.vocab, "cuda")
            sampler = Sampler(seed=0)
            times = {}
            for mode in ("torch", "triton"):
                os.environ["ZIGGURAT_KERNELS"] = mode
                times[mode] = triton.testing.do_bench(lambda: sampler(logits, batch, gen), warmup=10, rep=100) * 1e3
            os.environ.pop("ZIGGURAT_KERNELS")
            print(f"{name:<12}{b:>6}{times['torch']:>10.1f}{times['triton']:>11.1f}{times['torch'] / times['triton']:>9.2f}",
                  flush=True)
            res["rows"].append({"mix": name, "batch": b, "torch_us": times["torch"], "triton_us": times["triton"]})
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
