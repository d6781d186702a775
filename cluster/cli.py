"""The `ziggurat` command.

    ziggurat serve [--model DIR] [--tensor-parallel-size N] [--replicas N] [--host H] [--port P] [--api-key K]
    ziggurat chat "prompt"        # streams the answer from a running endpoint
    ziggurat complete "prompt"
    ziggurat generate --model DIR "prompt"   # offline, in this process
    ziggurat make-model OUT --arch qwen3 --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _serve(args) -> int:
    from ziggurat.cluster.deploy import Deployment, DeploymentSpec, ensure_ray

    keys = tuple(args.api_key or ()) or tuple(k for k in os.environ.get("ZIGGURAT_API_KEYS", "").split(",") if k)
    info = ensure_ray()
    spec = DeploymentSpec(
        model=args.model, served_model_name=args.served_model_name, tensor_parallel_size=args.tensor_parallel_size,
        replicas=args.replicas, host=args.host, port=args.port, ingresses=args.ingresses, api_keys=keys,
        device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=not args.no_prefix_caching,
        db=args.db, admin_key=args.admin_key or os.environ.get("ZIGGURAT_ADMIN_KEY"),
        share_prefix_cache=args.share_prefix_cache, redact=args.redact,
    )
    if args.model is None:
        print("ziggurat: no --model given; serving the embedded default model (random weights, made on first use)")
    dep = Deployment(spec)
    print(f"ziggurat: serving '{dep.served_model_name}' ({args.replicas} replica(s), tensor parallel {args.tensor_parallel_size})")
    print(f"  OpenAI API:     {dep.base_url}")
    if info.get("dashboard_url"):
        print(f"  Ray dashboard:  http://{info['dashboard_url']}")
    print(f"  ledger:         {dep.db}")
    print("  auth:           " + ("open: no API keys configured, every request is the 'default' tenant"
                                  if dep.open else "API key required"))
    print("Press Ctrl-C to stop.", flush=True)
    dep.run_forever()
    print("ziggurat: stopped")
    return 0


def _request(args, path: str, body: dict | None = None):
    """A plain-HTTP OpenAI call (no SDK needed): returns the response object."""
    import urllib.request

    key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("ZIGGURAT_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(args.base_url.rstrip("/") + path, data=data, headers=headers)
    return urllib.request.urlopen(req, timeout=600)


def _stream(args, path: str, body: dict, piece) -> int:
    import urllib.error

    try:
        if not args.model_name:
            with _request(args, "/models") as r:
                args.model_name = json.load(r)["data"][0]["id"]
        body = dict(body, model=args.model_name, stream=True, max_tokens=args.max_tokens, temperature=args.temperature)
        with _request(args, path, body) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                if chunk.get("choices"):
                    print(piece(chunk["choices"][0]) or "", end="", flush=True)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error", {}).get("message")
        except ValueError:
            message = e.reason
        print(f"error {e.code}: {message}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"error: cannot reach {args.base_url}: {e.reason}", file=sys.stderr)
        return 1
    print()
    return 0


def _chat(args) -> int:
    return _stream(args, "/chat/completions", {"messages": [{"role": "user", "content": args.prompt}]},
                   lambda c: c.get("delta", {}).get("content"))


def _complete(args) -> int:
    return _stream(args, "/completions", {"prompt": args.prompt}, lambda c: c.get("text"))


def _generate(args) -> int:
    from ziggurat import LLM, SamplingParams

    llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size)
    outs = llm.generate(args.prompts, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))
    for o in outs:
        print(json.dumps({"prompt": o.prompt, "text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason}))
    llm.shutdown()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ziggurat", description="LLM serving on Ray")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="deploy an OpenAI-compatible endpoint on Ray")
    s.add_argument("--model", default=None, help="HF-format model directory (default: the embedded small model)")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--ingresses", type=int, default=1, help="HTTP actors sharing the port (scale HTTP/SSE over cores)")
    s.add_argument("--api-key", action="append", help="require this API key (repeatable; or ZIGGURAT_API_KEYS=a,b)")
    s.add_argument("--device", default=None, choices=[None, "cpu", "cuda"])
    s.add_argument("--dtype", default=None)
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--max-num-batched-tokens", type=int, default=8192)
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--num-kv-blocks", type=int, default=None)
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--db", default=os.environ.get("ZIGGURAT_DB"), help="ledger: SQLite path or postgresql:// URL")
    s.add_argument("--admin-key", default=None, help="enables the /admin API (or ZIGGURAT_ADMIN_KEY)")
    s.add_argument("--share-prefix-cache", action="store_true",
                   help="share cached prompt prefixes across tenants (a public system prompt); tenants can then "
                        "observe each other's cache hits by timing")
    s.add_argument("--redact", default=None,
                   help="module:function applied to request logs before they are stored "
                        "(e.g. ziggurat.actors.meter.tenancy:redact_pii)")
    s.set_defaults(fn=_serve)
    from ziggurat.cluster.tenant_cli import add_tenant_commands

    add_tenant_commands(sub)

    for name, fn in (("chat", _chat), ("complete", _complete)):
        c = sub.add_parser(name, help=f"stream a {name} answer from a running endpoint")
        c.add_argument("prompt")
        c.add_argument("--base-url", default=os.environ.get("ZIGGURAT_URL", "http://127.0.0.1:8000/v1"))
        c.add_argument("--api-key", default=None)
        c.add_argument("--model-name", default=None)
        c.add_argument("--max-tokens", type=int, default=128)
        c.add_argument("--temperature", type=float, default=0.7)
        c.set_defaults(fn=fn)

    g = sub.add_parser("generate", help="offline generation in this process")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--model", required=True)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.set_defaults(fn=_generate)

    m = sub.add_parser("make-model", help="write a random-weight HF-format model directory", add_help=False)
    m.set_defaults(fn=None)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "make-model":
        from ziggurat.models.maker import main as make_main

        return make_main(argv[1:])
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
