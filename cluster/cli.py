"""The `ziggurat` command.

    ziggurat serve [--model DIR] [--tensor-parallel-size N] [--replicas N] [--host H] [--port P] [--api-keys-file F]
    ziggurat chat "prompt"        # streams the answer from a running endpoint
    ziggurat complete "prompt"
    ziggurat generate --model DIR "prompt"   # offline, in this process
    ziggurat make-model OUT --arch qwen3 --preset tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def add_fields(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per dataclass field that has help (and no cli=False): --field-name,
    its type and help from the field, booleans as --x/--no-x. Defaults are left
    to the dataclass (argparse.SUPPRESS), so they are stated once."""
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata or f.metadata.get("cli") is False:
            continue
        names = ["--" + f.name.replace("_", "-")] + ([f.metadata["short"]] if "short" in f.metadata else [])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata["help"] + (f" (default: {default})" if default not in (None, (), "") else "")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(*names, dest=f.name, type=conv, default=argparse.SUPPRESS, help=help_)


def given(args, cls) -> dict:
    """The flags of `cls`'s fields that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _secret_list(name: str) -> tuple[str, ...]:
    return tuple(k for k in os.environ.get(name, "").split(",") if k)


def read_secret_file(path: str | None, what: str) -> list[str]:
    """Secrets come from files or the environment, never the command line (ps shows argv):
    one per line, blank lines and #-comments skipped."""
    if not path:
        return []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise SystemExit(f"ziggurat: cannot read {what} file {path}: {e.strerror}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _serve(args) -> int:
    from ziggurat.cluster import deployment_file as dfile

    file_kw, file = {}, None
    if args.config:
        try:
            file_kw = dfile.load(args.config)
        except dfile.DeploymentFileError as e:
            print(f"ziggurat serve: {e}", file=sys.stderr)
            return 2
        file = file_kw.pop("_file")
    address = args.address or file_kw.pop("address", None)
    file_kw.pop("address", None)
    keys_file = args.api_keys_file or file_kw.pop("api_keys_file", None)
    admin_file = args.admin_key_file or file_kw.pop("admin_key_file", None)
    file_kw.pop("api_keys_file", None), file_kw.pop("admin_key_file", None)
    if address:
        os.environ["RAY_ADDRESS"] = address
    if not os.environ.get("RAY_ADDRESS"):
        # A local cluster of ours: Ray's token authentication on. Ray reads this when
        # it is imported, so before anything imports it (nothing above this has).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ziggurat.actors.ingress.server import IngressConfig
    from ziggurat.cluster.deploy import Deployment, ensure_ray
    from ziggurat.cluster.spec import DeploymentSpec, HealthConfig
    from ziggurat.config import EngineConfig

    from ziggurat.actors.router.scoring import RouterConfig
    from ziggurat.cluster.autoscale import AutoscalingConfig

    flags = {**given(args, EngineConfig), **given(args, IngressConfig), **given(args, HealthConfig),
             **given(args, AutoscalingConfig), **given(args, RouterConfig),
             **given(args, DeploymentSpec)}
    flat = {**file_kw, **flags}
    flat["api_keys"] = tuple(read_secret_file(keys_file, "API keys")) or _secret_list("ZIGGURAT_API_KEYS")
    admin = read_secret_file(admin_file, "admin key")
    flat["admin_key"] = admin[0] if admin else os.environ.get("ZIGGURAT_ADMIN_KEY")
    try:
        spec = dfile.build(flat, file, set(flags))
    except (ValueError, TypeError) as e:
        print(f"ziggurat serve: {e}", file=sys.stderr)
        return 2
    info = ensure_ray(log_level=spec.log_level)
    from ziggurat.actors.process import configure_logging

    configure_logging(spec.log_level)
    if flat.get("model") is None:
        from ziggurat.cluster.spec import default_model

        print(f"ziggurat: {default_model()[1]}")
    try:
        dep = Deployment(spec, progress=lambda line: print(f"ziggurat: {line}", flush=True))
    except Exception as e:  # a busy port, a cluster that cannot hold the replicas, a model that fails to load
        cause = e
        while getattr(cause, "cause", None) is not None or type(cause).__name__.startswith("Ray"):
            inner = getattr(cause, "cause", None)
            if inner is None or inner is cause:
                break
            cause = inner
        print(f"ziggurat serve: {str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__}",
              file=sys.stderr)
        return 1
    spec = dep.spec
    pools = ", ".join(f"{p.replicas} {p.role} (TP {p.tensor_parallel_size or spec.engine.tensor_parallel_size}"
                      + (f", autoscaling {p.lo}-{p.hi})" if p.scales else ")") for p in spec.pools)
    print(f"ziggurat: serving '{dep.served_model_name}': {pools}")
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


def _topology(args) -> int:
    from ziggurat.topology import nvml

    topo = nvml.read()
    print(nvml.resources_json(topo) if args.what == "resources" else json.dumps(topo.summary(), indent=1))
    return 0


def dfile_example() -> str:
    from ziggurat.cluster.deployment_file import EXAMPLE

    return EXAMPLE


def _config_check(args) -> int:
    from ziggurat.cluster.deployment_file import DeploymentFileError, spec_from_file

    try:
        spec = spec_from_file(args.path)
    except (DeploymentFileError, ValueError, TypeError) as e:
        print(f"ziggurat config check: {e}", file=sys.stderr)
        return 2
    pools = ", ".join(f"{p.replicas} {p.role}" + (f" ({p.lo}-{p.hi})" if p.scales else "") for p in spec.pools)
    print(f"{args.path}: ok ({pools}; model {spec.engine.model})")
    return 0


def _request(args, path: str, body: dict | None = None):
    """A plain-HTTP OpenAI call (no SDK needed): returns the response object."""
    import urllib.request

    keys = read_secret_file(args.api_key_file, "API key")
    key = keys[0] if keys else os.environ.get("OPENAI_API_KEY") or os.environ.get("ZIGGURAT_API_KEY")
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
        body = dict(body, model=args.model_name, stream=True, max_tokens=args.max_tokens,
                    stream_options={"include_usage": True})
        if args.temperature is not None:
            body["temperature"] = args.temperature
        t0, first, usage = time.perf_counter(), None, None
        with _request(args, path, body) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices"):
                    text = piece(chunk["choices"][0]) or ""
                    if text and first is None:
                        first = time.perf_counter() - t0
                    print(text, end="", flush=True)
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
    if args.stats and usage:
        total = time.perf_counter() - t0
        n = usage["completion_tokens"]
        rate = (n - 1) / (total - first) if first is not None and n > 1 and total > first else 0.0
        ttft = f"{first:.2f} s" if first is not None else "-"
        print(f"[{n} tokens; time to first token {ttft}; {rate:.1f} tok/s after it; {total:.2f} s in all]",
              file=sys.stderr)
    return 0


def _chat(args) -> int:
    return _stream(args, "/chat/completions", {"messages": [{"role": "user", "content": args.prompt}]},
                   lambda c: c.get("delta", {}).get("content"))


def _complete(args) -> int:
    return _stream(args, "/completions", {"prompt": args.prompt}, lambda c: c.get("text"))


def _generate(args) -> int:
    from ziggurat import LLM, SamplingParams
    from ziggurat.config import EngineConfig

    kw = given(args, EngineConfig)
    if kw.get("model") is None:
        from ziggurat.cluster.spec import default_model

        kw["model"], notice = default_model()
        print(f"ziggurat: {notice}", file=sys.stderr)
    llm = LLM(**kw)
    outs = llm.generate(args.prompts, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature))
    for o in outs:
        print(json.dumps({"prompt": o.prompt, "text": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason}))
    llm.shutdown()
    return 0


def main(argv=None) -> int:
    from ziggurat import __version__

    ap = argparse.ArgumentParser(prog="ziggurat", description="LLM serving on Ray")
    ap.add_argument("--version", action="version", version=f"ziggurat {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    topo = sub.add_parser("topology", help="this node's GPUs as NVML reports them (NVLink islands, NUMA, InfiniBand)")
    topo.add_argument("what", nargs="?", choices=("show", "resources"), default="show",
                      help="show: the topology as JSON; resources: the custom resources `ray start --resources` "
                           "advertises")
    topo.set_defaults(fn=_topology)

    from ziggurat.actors.ingress.server import IngressConfig
    from ziggurat.cluster.spec import DeploymentSpec, HealthConfig
    from ziggurat.config import EngineConfig

    # No abbreviations: `--api-key K` must not pass for `--api-keys-file K` (a secret on argv).
    s = sub.add_parser("serve", help="deploy an OpenAI-compatible endpoint on Ray", allow_abbrev=False)
    add_fields(s.add_argument_group("engine (every replica)"), EngineConfig)
    add_fields(s.add_argument_group("HTTP ingress"), IngressConfig)
    add_fields(s.add_argument_group("deployment"), DeploymentSpec)
    add_fields(s.add_argument_group("supervisor"), HealthConfig)
    from ziggurat.cluster.autoscale import AutoscalingConfig

    add_fields(s.add_argument_group("autoscaling (pools with max_replicas > min_replicas)"), AutoscalingConfig)
    from ziggurat.actors.router.scoring import RouterConfig

    add_fields(s.add_argument_group("routing"), RouterConfig)
    s.add_argument("--api-keys-file", default=None,
                   help="require these API keys, one per line (or ZIGGURAT_API_KEYS=a,b); never on the command line")
    s.add_argument("--admin-key-file", default=None, help="enables the /admin API (or ZIGGURAT_ADMIN_KEY)")
    s.add_argument("--config", default=None, help="a deployment file (YAML: `ziggurat config example`); "
                                                  "flags override its values")
    s.add_argument("--address", default=None, help="the Ray cluster to join: auto (a running local one) or "
                                                   "ray://HEAD:10001 (default: $RAY_ADDRESS, else start one)")
    s.set_defaults(fn=_serve)
    cfg = sub.add_parser("config", help="deployment files")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True)
    ex = cfg_sub.add_parser("example", help="print a commented example deployment file")
    ex.set_defaults(fn=lambda a: print(dfile_example(), end="") or 0)
    chk = cfg_sub.add_parser("check", help="validate a deployment file (without starting anything)")
    chk.add_argument("path")
    chk.set_defaults(fn=_config_check)
    from ziggurat.cluster.tenant_cli import add_tenant_commands

    add_tenant_commands(sub)

    for name, fn in (("chat", _chat), ("complete", _complete)):
        c = sub.add_parser(name, help=f"stream a {name} answer from a running endpoint")
        c.add_argument("prompt")
        c.add_argument("--base-url", default=os.environ.get("ZIGGURAT_URL", "http://127.0.0.1:8000/v1"))
        c.add_argument("--api-key-file", default=None, help="default: $OPENAI_API_KEY or $ZIGGURAT_API_KEY")
        c.add_argument("--model-name", default=None)
        c.add_argument("--max-tokens", type=int, default=128)
        c.add_argument("--temperature", type=float, default=0.0,
                       help="default 0 (greedy: the model's best answer); e.g. 0.7 for variety")
        c.add_argument("--stats", action="store_true", help="print tokens, time to first token and tok/s to stderr")
        c.set_defaults(fn=fn)

    g = sub.add_parser("generate", help="offline generation in this process")
    g.add_argument("prompts", nargs="+")
    add_fields(g.add_argument_group("engine"), EngineConfig)
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
