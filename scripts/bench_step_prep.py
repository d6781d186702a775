"""Host-side cost of preparing one decode step for 256 requests (CPU only; no GPU needed).

    python -m ziggurat.scripts.bench_step_prep [--model DIR]

Times ModelRunner._prepare (flat inputs, row mapping, block tables) and
SamplingBatch.build as the runner calls it, for 256 running requests of
1000 tokens (63 blocks each) decoding one token. These run on the worker
before every forward, so on a GPU they are on the critical path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=256)
    args = ap.parse_args(argv)
    import numpy as np
    import torch

    from ziggurat.models.config import ModelConfig
    from ziggurat.models.runner import ModelRunner
    from ziggurat.models.sampler import SamplingBatch
    from ziggurat.models.step import NewRequestData, StepInput
    from ziggurat.sampling_params import SamplingParams

    if args.model is None:
        from ziggurat.models.maker import make_model

        args.model = str(make_model(tempfile.mkdtemp(), arch="llama", preset="tiny"))
    cfg = ModelConfig.from_dir(args.model)
    n = args.requests
    r = ModelRunner(cfg, torch.device("cpu"), 16, 2048)
    step = StepInput(rows=np.arange(n, dtype=np.int32), num_tokens=np.ones(n, dtype=np.int32))
    for i in range(n):
        step.new_requests.append(NewRequestData(f"r{i}", i, list(range(1000)), [], SamplingParams(),
                                                list(range(i * 70, i * 70 + 63)), 999))
    r._update_states(step)

    def timed(fn, reps):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e6

    rs = [r.requests[i] for i in range(n)]
    res = {
        "bench": "step-prep", "requests": n, "date": time.strftime("%Y-%m-%d"),
        "prepare_us": timed(lambda: r._eager_inputs(r._prepare(step)), 50),
        "sampling_batch_us": timed(lambda: SamplingBatch.build(
            [x.params for x in rs], [() for _ in rs], [range(len(x.token_ids) - x.prompt_len) for x in rs],
            cfg.vocab_size, torch.device("cpu")), 50),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
