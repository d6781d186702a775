"""KV transfer latency and bandwidth per backend, for prompts of 128 to 32k tokens.

    python -m ziggurat.scripts.bench_kv_transfer                       # Llama-3.1-8B shape, bf16, on the GPU
    python -m ziggurat.scripts.bench_kv_transfer --tokens 128,2048 --backends ipc,group --json out.json

A source process (spawned) holds KV caches of the given shape filled with
random values and serves them exactly as a prefill worker does
(models/kv_transfer.py: KVSide.endpoint / serve); this process is the
destination and pulls a prompt's blocks into its own caches through
KVSide.pull, the decode worker's call, per backend:

    ipc    CUDA IPC mapping of the source's caches + one copy kernel per pull
    group  a two-rank process group (gloo on CPU; on one GPU NCCL cannot pair a device
           with itself, so its figures come from a two-GPU machine)
    local  both caches in this process (the kernel alone, no IPC)

Each pull is checked against the source's blocks. Reported per backend and
size: p50/p99 of the pull's time (what the decode worker's call costs,
uploads included), and its effective bandwidth counted as the copy rate is
(bytes read plus written), beside the device-to-device copy rate measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch


class _Layer:
    def __init__(self, k, v):
        self.k_cache, self.v_cache = k, v


class Caches:
    """What KVSide needs of a model: attention layers holding k_cache / v_cache."""

    def __init__(self, layers: int, blocks: int, block_size: int, heads: int, head_dim: int, dtype, device, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (blocks, block_size, heads, head_dim)
        self.layers = [_Layer(torch.randn(shape, generator=g, device=device).to(dtype),
                              torch.randn(shape, generator=g, device=device).to(dtype)) for _ in range(layers)]

    def attention_layers(self):
        return self.layers


def _source(conn, shape: dict, device: str) -> None:
    from ziggurat.models.kv_transfer import KVSide

    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    model = Caches(**shape, device=dev, seed=1)
    side = KVSide(model, dev, 0, 1, shape["heads"], timeout_s=60)
    conn.send(side.endpoint())
    while True:
        msg = conn.recv()
        if msg[0] == "serve":
            side.serve(msg[1], msg[2])
            conn.send("ok")
        else:
            return


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    return torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None else dev


def copy_rate(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="128,512,2048,8192,32768", help="prompt lengths, comma-separated")
    ap.add_argument("--backends", default="ipc,local,group")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--group-max-tokens", type=int, default=8192, help="skip the (staged, slow) group backend above")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from ziggurat.models.kv_blocks import cache_tensors
    from ziggurat.models.kv_transfer import KVSide
    from ziggurat.models.step import KVPull

    dev = _device(args.device)
    dtype = getattr(torch, args.dtype)
    sizes = [int(t) for t in args.tokens.split(",")]
    max_blocks = -(-max(sizes) // args.block_size)
    shape = dict(layers=args.layers, blocks=max_blocks + 8, block_size=args.block_size, heads=args.kv_heads,
                 head_dim=args.head_dim, dtype=dtype)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_source, args=(child, shape, args.device), daemon=True)
    proc.start()
    if not parent.poll(120):
        raise SystemExit("the source process did not start (see its traceback above)")
    src_ep = parent.recv()
    dst = Caches(**shape, device=dev, seed=2)
    side = KVSide(dst, dev, 0, 1, args.kv_heads, timeout_s=60)

    def request_pair(ep, pair_id, backend):
        parent.send(("serve", pair_id, backend))
        if not parent.poll(60):
            raise RuntimeError("the source process does not answer")
        assert parent.recv() == "ok"

    side.request_pair = request_pair
    local_src = Caches(**shape, device=dev, seed=1)
    local_ep = KVSide(local_src, dev, 0, 1, args.kv_heads).endpoint()

    rate = copy_rate(dev) if dev.type == "cuda" else float("nan")
    print(f"device copy: {rate / 1e12:.2f} TB/s (read + written)  device: "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
    results = []
    for backend in args.backends.split(","):
        if backend == "ipc" and dev.type != "cuda":
            continue
        for n in sizes:
            if backend == "group" and n > args.group_max_tokens:
                continue
            nb = -(-n // args.block_size)
            src_ids = list(range(nb))
            dst_ids = list(range(8, 8 + nb))[::-1]  # a different, scattered placement
            ep = local_ep if backend == "local" else src_ep
            if backend == "group":  # force the group path even on one host (the source is elsewhere to it)
                from dataclasses import replace

                ep = replace(src_ep, location=replace(src_ep.location, host="elsewhere"))
            pull = KVPull(f"bench-{n}", [ep], src_ids, dst_ids)
            side.pull([pull])  # warm-up: mapping, pairing, kernel compile
            reps = args.reps if backend != "group" else max(3, args.reps // 10)
            secs = []
            for _ in range(reps):
                rec = side.pull([pull])[0]
                if rec.error:
                    raise SystemExit(f"{backend} pull failed: {rec.error}")
                secs.append(rec.seconds)
            # Check: every layer's blocks equal the source's.
            src_caches = cache_tensors(local_src) if backend == "local" else side._ipc.get(src_ep.key)
            if src_caches is None:  # group on CPU: no mapping; compare against a regenerated source
                src_caches = cache_tensors(Caches(**shape, device=dev, seed=1))
            d = cache_tensors(dst)
            ok = all(torch.equal(d[i][j][dst_ids], src_caches[i][j][src_ids]) for i in range(len(d)) for j in (0, 1))
            nbytes = rec.bytes
            p50, p99 = statistics.median(secs), sorted(secs)[min(len(secs) - 1, int(0.99 * len(secs)))]
            eff = 2 * nbytes / p50
            row = dict(backend=backend, tokens=n, blocks=nb, mbytes=nbytes / 1e6, p50_ms=p50 * 1e3, p99_ms=p99 * 1e3,
                       effective_tb_s=eff / 1e12, of_copy_rate=eff / rate if rate == rate else None, exact=ok,
                       reps=reps)
            results.append(row)
            print(f"{backend:6s} {n:6d} tokens {nbytes / 1e6:9.1f} MB  p50 {p50 * 1e3:8.3f} ms  p99 {p99 * 1e3:8.3f} ms"
                  f"  {eff / 1e12:6.2f} TB/s" + (f" = {eff / rate:5.1%} of copy" if rate == rate else "")
                  + ("" if ok else "  MISMATCH"))
    parent.send(("quit",))
    proc.join(timeout=10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_rate_tb_s": rate / 1e12, "shape": {k: str(v) for k, v in shape.items()},
                       "results": results, "at": time.time()}, f, indent=1)
    return 0 if all(r["exact"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
