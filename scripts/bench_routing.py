"""Routing benchmark: the shared-prefix workload of issue 15 through each routing policy.

    python -m ziggurat.scripts.bench_routing                      # in-process, 4 replicas, every policy, seeds 0-2
    python -m ziggurat.scripts.bench_routing --policies kv-aware,round-robin --seeds 0 --restart
    python -m ziggurat.scripts.bench_routing --deploy --seeds 0   # a local Ray deployment per policy, over HTTP
    python -m ziggurat.scripts.bench_routing --url http://host:8000 --api-key-env ZIGGURAT_KEY   # any deployment

The workload (seeded): G groups of P prompts, each a group's S-token system
prompt plus its own question, and C chats of T turns (each turn the whole
conversation so far: a shared `chat_system_blocks`-block system prompt, then
its own user messages and the model's answers), interleaved, at most
`concurrency` requests in flight; a chat's next turn is queued a few requests
after its previous answer ends.

In-process (default): real engines (the tiny random-weight model, real
KVCacheManager and BlockPool with real eviction) behind the real policy.Router
fed by real KVEvents and ReplicaStats, in simulated time: a replica's step
takes step_s + prefill tokens / prefill_tokens_per_s + rows x row_s (the same
prefill rate the kv-aware cost assumes), KV events and reports reach the
router `lag_s` later, reports every `report_s`. Events are processed in time
order, so the figures are deterministic per seed. TTFT is simulated time.
"Oracle" routes each request to the replica whose cache (probed directly,
at that instant) holds the longest prefix of it, ties by fewest requests.

Hit rate = sum of cached tokens / sum of prompt tokens, from the usage each
client receives. Per-replica load = requests served. Moves = chat turns served
by another replica than the turn before.

Over HTTP (--url, --deploy): the same workload with real concurrency (at most
`concurrency` streaming /v1/completions in flight, token-id prompts), usage
from each stream's final chunk (`prompt_tokens_details.cached_tokens`), TTFT
wall-clock from sending to the first token's chunk, per-replica load from the
deployment's /metrics (ziggurat_request_success_total by replica, before and
after). A chat's next turn carries the model's answer, as its ids come back
with vLLM's `return_token_ids` (as an agent sends back what it got); for a
deployment without it, --seeded-answers sends a stand-in fixed by the seed
(Workload.answers="seeded": the previous turn's prompt blocks can hit, its
answer's cannot). A live deployment's caches cannot be probed at each
request's instant, so the oracle is the simulation's on the same workload
(its answers are other tokens, of the same length: the same hits) and cache
size ("% of the simulated oracle"); moves are not visible over HTTP (the
response does not name its replica); --deploy reads the router's load
overrides instead.
--deploy starts, per policy, a local Ray deployment on CPU (cluster/deploy.py:
`replicas` replicas of the tiny model, `num_blocks` KV blocks each, that
routing_policy), runs every seed against it in turn (each seed's prompts are
new random tokens, so an earlier seed's blocks only occupy the cache until
evicted, oldest first), and shuts it down.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import heapq
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from ziggurat.actors.router.policy import Router
from ziggurat.actors.router.scoring import POLICIES, RouterConfig
from ziggurat.actors.scheduler.block_pool import prompt_block_hashes
from ziggurat.actors.scheduler.messages import SubmitRequest
from ziggurat.sampling_params import SamplingParams


@dataclass
class Workload:
    seed: int = 0
    groups: int = 16
    per_group: int = 8
    chats: int = 16
    turns: int = 4
    system_tokens: int = 600
    chat_system_blocks: int = 3
    block_size: int = 16
    max_tokens: int = 16
    vocab: int = 1000
    answers: str = "model"  # "seeded": a chat's history carries a seeded stand-in for each answer (over HTTP)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        tok = lambda n: [rng.randrange(1, self.vocab) for _ in range(n)]  # noqa: E731
        self.group_system = [tok(self.system_tokens) for _ in range(self.groups)]
        self.questions = [[tok(rng.randint(16, 48)) for _ in range(self.per_group)] for _ in range(self.groups)]
        self.chat_system = tok(self.chat_system_blocks * self.block_size)
        self.user = [[tok(rng.randint(24, 64)) for _ in range(self.turns)] for _ in range(self.chats)]
        jobs = [("group", g, i) for g in range(self.groups) for i in range(self.per_group)]
        jobs += [("chat", c, 0) for c in range(self.chats)]
        rng.shuffle(jobs)
        self.first_jobs = jobs
        self.think = random.Random(self.seed + 1)  # where a chat's next turn goes in the queue

    @property
    def num_requests(self) -> int:
        return self.groups * self.per_group + self.chats * self.turns

    def prompt(self, job, history: dict) -> list[int]:
        kind, k, i = job
        if kind == "group":
            return self.group_system[k] + self.questions[k][i]
        return list(history.get(k, self.chat_system)) + self.user[k][i]

    def next_turn_position(self, queue_len: int) -> int:
        return min(queue_len, self.think.randint(2, 8))

    def history_after(self, job, prompt: list[int], output: list[int]) -> list[int]:
        """A chat's conversation after this turn: its prompt and the answer (the model's
        tokens, or with answers="seeded" a stand-in fixed by the seed, chat and turn)."""
        if self.answers == "seeded":
            rng = random.Random(f"{self.seed}.{job[1]}.{job[2]}")
            output = [rng.randrange(1, self.vocab) for _ in range(self.max_tokens)]
        return prompt + list(output)


@dataclass
class RunResult:
    policy: str
    seed: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_replica: list = field(default_factory=list)
    moves: int = 0
    load_moves: int = 0  # moves the router made because load outweighed the longer match
    ttft: list = field(default_factory=list)
    kind_tokens: dict = field(default_factory=lambda: {"group": [0, 0], "chat": [0, 0]})
    restarted: bool = False
    snapshots: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)

    @property
    def imbalance(self) -> float:
        return max(self.per_replica) / max(min(self.per_replica), 1)

    def pct(self, q: float) -> float:
        xs = sorted(self.ttft)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    def summary(self) -> dict:
        return {"policy": self.policy, "seed": self.seed, "hit_rate": round(self.hit_rate, 4),
                "group_hit_rate": round(self.kind_tokens["group"][1] / max(self.kind_tokens["group"][0], 1), 4),
                "chat_hit_rate": round(self.kind_tokens["chat"][1] / max(self.kind_tokens["chat"][0], 1), 4),
                "per_replica": self.per_replica, "imbalance": round(self.imbalance, 3), "moves": self.moves,
                "load_moves": self.load_moves, "ttft_p50_ms": round(1e3 * self.pct(0.5), 2),
                "ttft_p99_ms": round(1e3 * self.pct(0.99), 2), "restarted": self.restarted,
                "snapshots": self.snapshots}


class _CountingExecutor:
    """The engine's executor, counting the tokens and rows of each step (simulated step time)."""

    def __init__(self, inner):
        self.inner, self.tokens, self.rows = inner, 0, 0

    def execute_async(self, step, *a, **kw):
        self.tokens += step.total_tokens
        self.rows += len(step.rows)
        return self.inner.execute_async(step, *a, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class NoModelExecutor:
    """An executor without a model: it keeps each row's tokens and computed count as
    the workers do (models/step.py) and samples a token that depends only on the
    sequence so far (so a conversation's history is the same wherever it runs).
    Everything above it (scheduler, KV manager, block pool, eviction) is real."""

    def __init__(self, config, max_model_len: int):
        self.config, self.rows = config, {}

    def determine_num_blocks(self) -> int:
        return self.config.num_kv_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute_async(self, step):
        return step

    def wait(self, step):
        import numpy as np

        from ziggurat.models.step import StepOutput

        for row in step.finished_rows:
            self.rows.pop(row, None)
        for nr in step.new_requests:
            self.rows[nr.row] = [list(nr.prompt_token_ids) + list(nr.output_token_ids), nr.num_computed_tokens]
        rows, toks = [], []
        for row, n in step.scheduled():
            st = self.rows[row]
            st[1] += n
            if st[1] >= len(st[0]):
                t = 1 + hash(tuple(st[0][-8:])) % 999
                st[0].append(t)
                rows.append(row)
                toks.append(t)
        return StepOutput(np.asarray(rows, dtype=np.int32), np.asarray(toks, dtype=np.int32))

    def shutdown(self) -> None:
        pass


@dataclass
class SimConfig:
    replicas: int = 4
    num_blocks: int = 224  # per replica: 27% of the workload's distinct reused prefix blocks
    concurrency: int = 4
    step_s: float = 0.004
    prefill_tokens_per_s: float = 20000.0
    row_s: float = 0.0001
    lag_s: float = 0.002  # KV events and reports reach the router this much later
    submit_lag_s: float = 0.0  # a routed request reaches its replica this much later (the ingress's submit call)
    report_s: float = 0.2
    restart_at: float | None = None  # fraction of the requests after which the router restarts (empty)


def make_engines(model: str, cfg: SimConfig, block_size: int = 16, real_model: bool = False):
    """cfg.replicas engines; real_model=False: no forward pass (NoModelExecutor)."""
    from ziggurat.actors.scheduler.engine import EngineCore
    from ziggurat.actors.scheduler.executor import make_executor
    from ziggurat.config import EngineConfig

    ecfg = EngineConfig(model=str(model), num_kv_blocks=cfg.num_blocks, device="cpu", dtype="float32",
                        block_size=block_size, async_scheduling=False, max_num_seqs=64)
    inner = make_executor if real_model else NoModelExecutor
    return [EngineCore(ecfg, executor_factory=lambda c, n: _CountingExecutor(inner(c, n)))
            for _ in range(cfg.replicas)]


def simulate(engines, workload: Workload, policy: str, cfg: SimConfig | None = None,
             router_config: RouterConfig | None = None) -> RunResult:
    """One run of the workload through `policy` ("oracle" too) on these engines (their caches are reset first)."""
    from ziggurat.actors.scheduler.loop import SchedulerLoop

    cfg = cfg or SimConfig()
    bs = workload.block_size
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    rcfg = dataclasses.replace(router_config or RouterConfig(), routing_policy=policy if policy in POLICIES
                               else "kv-aware")

    def new_router() -> Router:
        return Router(len(engines), config=rcfg, block_size=bs, clock=clock)

    router = [new_router()]
    res = RunResult(policy, workload.seed, per_replica=[0] * len(engines))
    events: list = []  # (time, seq, kind, replica, payload)
    seq = [0]

    def at(t, kind, r, payload=None):
        seq[0] += 1
        heapq.heappush(events, (t, seq[0], kind, r, payload))

    outs: dict[int, list] = collections.defaultdict(list)
    kv_out: dict[int, list] = collections.defaultdict(list)
    loops = []
    for r, e in enumerate(engines):
        e.kv.reset_prefix_cache()
        lp = SchedulerLoop(e, r, lambda _i, b, r=r: outs[r].append(b), max_waiting=10_000)
        lp.register_ingress("ing", "sim")
        lp.publish_kv_events(lambda ev, r=r: kv_out[r].append(ev), interval_s=0.0)
        loops.append(lp)
    stepping = [False] * len(engines)
    last_report = [-1.0] * len(engines)
    queue = collections.deque(workload.first_jobs)
    history: dict[int, list[int]] = {}
    served_by: dict[int, int] = {}  # chat -> replica of its last turn
    live: dict[str, tuple] = {}  # request id -> (job, replica, submitted at, prompt)
    first_at: dict[str, float] = {}
    active = [0] * len(engines)
    submitted = [0]
    restart_after = None if cfg.restart_at is None else int(cfg.restart_at * workload.num_requests)

    def submit(t: float) -> None:
        job = queue.popleft()
        prompt = workload.prompt(job, history)
        if restart_after is not None and submitted[0] == restart_after:
            router[0] = new_router()  # a restarted router knows nothing: it asks for snapshots
            res.restarted = True
        submitted[0] += 1
        if policy == "oracle":
            r = max(range(len(engines)), key=lambda i: (engines[i].kv.probe(prompt), -active[i], -i))
            load_move = False
        else:
            r = router[0].route(prompt_block_hashes(prompt, bs), len(prompt)).replica
            load_move = router[0].last.load_override
        kind, k, i = job
        if kind == "chat" and i > 0:
            if served_by.get(k) != r:
                res.moves += 1
                res.load_moves += load_move
        if kind == "chat":
            served_by[k] = r
        rid = f"{kind}{k}.{i}"
        live[rid] = (job, r, t, prompt)
        active[r] += 1
        sp = SamplingParams(max_tokens=workload.max_tokens, temperature=0.0, ignore_eos=True)
        at(t + cfg.submit_lag_s, "arrive", r, SubmitRequest(rid, prompt, sp, "ing"))

    def finished(rid: str, t: float, prompt_tokens: int, cached: int, output: list[int]) -> None:
        job, r, t0, prompt = live.pop(rid)
        active[r] -= 1
        res.prompt_tokens += prompt_tokens
        res.cached_tokens += cached
        res.kind_tokens[job[0]][0] += prompt_tokens
        res.kind_tokens[job[0]][1] += cached
        res.per_replica[r] += 1
        res.ttft.append(first_at.pop(rid) - t0)
        kind, k, i = job
        if kind == "chat":
            history[k] = workload.history_after(job, prompt, output)
            if i + 1 < workload.turns:
                queue.insert(workload.next_turn_position(len(queue)), ("chat", k, i + 1))
        if queue:
            submit(t)

    tokens: dict[str, list[int]] = collections.defaultdict(list)
    for _ in range(cfg.concurrency):
        if queue:
            submit(0.0)
    while events:
        t, _, kind, r, payload = heapq.heappop(events)
        now[0] = t
        if kind == "router":
            what, msg = payload
            if what == "kv":
                if router[0].kv_events(msg):
                    loops[msg.replica].request_kv_snapshot()
            elif router[0].report(msg):
                loops[msg.replica].request_kv_snapshot()
            continue
        if kind == "arrive":  # the scheduler actor's submit: in the loop's inbox (and its queue counts) at once
            assert loops[r].submit(payload).ok
            if not stepping[r]:
                stepping[r] = True
                at(t, "step", r)
            continue
        if kind == "step":
            lp, ex = loops[r], engines[r].executor
            ex.tokens = ex.rows = 0
            lp.run_once(idle_timeout=0.0)
            dt = cfg.step_s + ex.tokens / cfg.prefill_tokens_per_s + ex.rows * cfg.row_s
            at(t + dt, "step_end", r, (outs.pop(r, []), kv_out.pop(r, [])))
            continue
        batches, kvs = payload  # step_end: its tokens reach the clients, its events the router
        for ev in kvs:  # published as the step ends (loop.py): with what arrived during the step queued
            ev.num_waiting += loops[r].num_pending
            at(t + cfg.lag_s, "router", r, ("kv", ev))
        if t - last_report[r] >= cfg.report_s:
            last_report[r] = t
            at(t + cfg.lag_s, "router", r, ("stats", loops[r].stats()))
        for b in batches:
            for u in b.updates:
                tokens[u.request_id].extend(u.new_token_ids)
                if u.request_id not in first_at:
                    first_at[u.request_id] = t
                if u.finish_reason is not None:
                    finished(u.request_id, t, u.num_prompt_tokens, u.num_cached_tokens, tokens.pop(u.request_id))
        if engines[r].has_unfinished() or loops[r].num_pending:
            at(t, "step", r)
        else:
            stepping[r] = False
    res.snapshots = router[0].kv.snapshots
    assert not live, f"{len(live)} requests never finished"
    return res


def run_policies(model: str, policies, seeds, cfg: SimConfig | None = None, workload_kw: dict | None = None,
                 router_config: RouterConfig | None = None, real_model: bool = False) -> list[RunResult]:
    cfg = cfg or SimConfig()
    engines = make_engines(model, cfg, real_model=real_model)
    out = []
    for seed in seeds:
        for p in policies:
            out.append(simulate(engines, Workload(seed=seed, **(workload_kw or {})), p, cfg, router_config))
    for e in engines:
        e.shutdown()
    return out


# -- over HTTP: any deployment (--url), or a local Ray deployment per policy (--deploy) --------------------


def replica_requests(metrics_text: str) -> dict[int, float]:
    """Finished requests per replica, from a /metrics page (ziggurat_request_success_total)."""
    out: dict[int, float] = collections.defaultdict(float)
    for line in metrics_text.splitlines():
        if line.startswith("ziggurat_request_success_total{"):
            labels, value = line[line.index("{") + 1:].rsplit("}", 1)
            lab = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
            out[int(lab["replica"].strip('"'))] += float(value)
    return dict(out)


async def _stream(http, url: str, body: dict) -> tuple[float | None, dict, list[int] | None]:
    """One streaming completion: (seconds to its first token's chunk, the usage of its last chunk,
    the answer's token ids if the chunks carry them: return_token_ids)."""
    t0, first, usage, ids = time.perf_counter(), None, None, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if first is None and chunk.get("choices"):  # the first chunk with text (or the end)
                first = time.perf_counter() - t0
            for c in chunk.get("choices") or ():
                if "token_ids" in c:
                    ids = (ids or []) + list(c["token_ids"])
            usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("the stream carried no usage (stream_options.include_usage)")
    return first, usage, ids


async def drive_http(url: str, workload: Workload, policy: str, concurrency: int = 4, api_key: str | None = None,
                     model: str | None = None, transport=None) -> RunResult:
    """The workload against a deployment at `url`, as simulate() runs it (the same queue: a
    chat's next turn is queued a few requests after its answer ends; at most `concurrency`
    in flight); a chat's history carries the answer's ids (return_token_ids), or with
    workload.answers "seeded" a stand-in. Per-replica load from /metrics (difference).
    transport: an httpx transport (tests: the ASGI app in process)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = RunResult(policy, workload.seed)
    queue = collections.deque(workload.first_jobs)
    history: dict[int, list[int]] = {}
    async with httpx.AsyncClient(headers=headers, timeout=300, transport=transport) as http:
        if model is None:
            r = await http.get(url + "/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        before = replica_requests((await http.get(url + "/metrics")).text)
        tasks: set = set()

        async def one(job) -> None:
            prompt = workload.prompt(job, history)
            body = {"model": model, "prompt": prompt, "max_tokens": workload.max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            if workload.answers == "model":
                body["return_token_ids"] = True
            ttft, usage, answer = await _stream(http, url, body)
            if workload.answers == "model" and answer is None:
                raise RuntimeError("the deployment returned no token_ids (return_token_ids): run with "
                                   "--seeded-answers")
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            res.prompt_tokens += usage["prompt_tokens"]
            res.cached_tokens += cached
            res.kind_tokens[job[0]][0] += usage["prompt_tokens"]
            res.kind_tokens[job[0]][1] += cached
            res.ttft.append(ttft if ttft is not None else 0.0)
            kind, k, i = job
            if kind == "chat":
                history[k] = workload.history_after(job, prompt, answer or [])
                if i + 1 < workload.turns:
                    queue.insert(workload.next_turn_position(len(queue)), ("chat", k, i + 1))
            if queue:
                start(queue.popleft())

        def start(job) -> None:
            t = asyncio.ensure_future(one(job))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        for _ in range(concurrency):
            if queue:
                start(queue.popleft())
        while tasks:
            done, _ = await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # a failed request fails the run, naming why
        await asyncio.sleep(0.5)  # the replicas' last finishes reach /metrics
        after = replica_requests((await http.get(url + "/metrics")).text)
    n = max([*before, *after], default=-1) + 1
    res.per_replica = [int(after.get(r, 0) - before.get(r, 0)) for r in range(n)]
    return res


def deploy_and_run(model: str, policy: str, seeds, cfg: SimConfig, workload_kw: dict | None = None,
                   router_settings: dict | None = None) -> list[RunResult]:
    """A local Ray deployment on CPU with this routing policy (cfg.replicas replicas, cfg.num_blocks
    KV blocks each), every seed's workload against it over HTTP, then shut down."""
    import tempfile

    import ray

    from ziggurat.cluster.deploy import Deployment
    from ziggurat.cluster.spec import DeploymentSpec

    if not ray.is_initialized():
        # A cluster of its own (address="local"), even where another was started with `ray start`.
        ray.init(address="local", num_cpus=2 * cfg.replicas + 4, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dep = Deployment(DeploymentSpec.from_flat(
            model=model, served_model_name="bench", port=0, device="cpu", dtype="float32",
            num_kv_blocks=cfg.num_blocks, replicas=cfg.replicas, db=f"{tmp}/ledger.db",
            **{**(router_settings or {}), "routing_policy": policy}))
        print(f"{policy}: deployment up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out = []
        try:
            for seed in seeds:
                w = Workload(seed=seed, **(workload_kw or {}))
                t0 = time.perf_counter()
                res = asyncio.run(drive_http(dep.url, w, policy, cfg.concurrency, model="bench"))
                rs = ray.get(dep.router.routing_stats.remote())
                res.load_moves = rs["load_overrides"] - sum(r.load_moves for r in out)  # this seed's
                res.moves = None  # not visible over HTTP
                print(f"{policy} seed {seed}: {time.perf_counter() - t0:.0f} s, hit rate {res.hit_rate:.3f}, "
                      f"per replica {res.per_replica}", file=sys.stderr)
                out.append(res)
        finally:
            dep.shutdown()
    return out


def report(results: list[RunResult], out=sys.stdout) -> dict:
    """Per policy: mean hit rate, % of the oracle's (same seeds), imbalance, moves, TTFT; one line each."""
    by = collections.defaultdict(list)
    for r in results:
        by[r.policy].append(r)
    oracle = {r.seed: r.hit_rate for r in by.get("oracle", [])}
    table = {}
    hdr = (f"{'policy':16} {'hit rate':>9} {'% oracle':>9} {'min %':>7} {'groups':>7} {'chats':>7} "
           f"{'busiest/least':>14} {'moves':>6} {'TTFT p50':>9} {'p99 (ms)':>9}  per-replica requests")
    print(hdr, file=out)
    for p, rs in by.items():
        pct = [r.hit_rate / oracle[r.seed] for r in rs if oracle.get(r.seed)]
        s = [r.summary() for r in rs]
        row = {"hit_rate": statistics.mean(r.hit_rate for r in rs),
               "pct_oracle": statistics.mean(pct) if pct else None, "min_pct_oracle": min(pct) if pct else None,
               "group_hit_rate": statistics.mean(x["group_hit_rate"] for x in s),
               "chat_hit_rate": statistics.mean(x["chat_hit_rate"] for x in s),
               "imbalance_max": max(r.imbalance for r in rs), "moves": [r.moves for r in rs],
               "load_moves": [r.load_moves for r in rs],
               "ttft_p50_ms": statistics.mean(x["ttft_p50_ms"] for x in s),
               "ttft_p99_ms": statistics.mean(x["ttft_p99_ms"] for x in s),
               "per_replica": [r.per_replica for r in rs], "runs": s}
        table[p] = row
        f = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        print(f"{p:16} {row['hit_rate']:9.3f} {f(row['pct_oracle']):>9} {f(row['min_pct_oracle']):>7} "
              f"{row['group_hit_rate']:7.3f} {row['chat_hit_rate']:7.3f} {row['imbalance_max']:14.2f} "
              f"{_moves(row):>6} {row['ttft_p50_ms']:9.1f} {row['ttft_p99_ms']:9.1f}  "
              f"{row['per_replica']}", file=out)
    return table


def _moves(row: dict) -> str:
    """Chat moves per run; over HTTP (not visible) the router's load overrides, as "(n)", or "-"."""
    if all(m is not None for m in row["moves"]):
        return "/".join(map(str, row["moves"]))
    if any(m for m in row["load_moves"]):
        return "/".join(f"({m})" for m in row["load_moves"])
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default=",".join(POLICIES + ("oracle",)))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default=None, help="model directory (default: the tiny random-weight llama)")
    ap.add_argument("--replicas", type=int, default=SimConfig.replicas)
    ap.add_argument("--num-blocks", type=int, default=SimConfig.num_blocks, help="KV blocks per replica")
    ap.add_argument("--concurrency", type=int, default=SimConfig.concurrency)
    ap.add_argument("--restart", action="store_true", help="also: kv-aware with a router restart half-way")
    ap.add_argument("--real-model", action="store_true", help="run the model's forward pass too (slow on a CPU; "
                                                              "the figures depend only on the caches)")
    ap.add_argument("--json", default=None, help="write every run's figures here")
    ap.add_argument("--url", default=None, help="run the workload against the deployment at this URL over HTTP "
                                                "(give --replicas and --num-blocks as it has them: the oracle's)")
    ap.add_argument("--api-key-env", default=None, help="with --url: the environment variable holding the API key")
    ap.add_argument("--label", default="deployment", help="with --url: the row's name (its routing policy)")
    ap.add_argument("--deploy", action="store_true", help="per policy, a local Ray deployment on CPU (the tiny "
                                                          "model or --model), the workload over HTTP")
    ap.add_argument("--seeded-answers", action="store_true", help="over HTTP: a chat's next turn carries a seeded "
                                                                  "stand-in for the answer (a deployment without "
                                                                  "return_token_ids)")
    ap.add_argument("--step-s", type=float, default=SimConfig.step_s, help="simulation: a step's fixed seconds")
    ap.add_argument("--submit-lag-s", type=float, default=SimConfig.submit_lag_s,
                    help="simulation: seconds from the router's pick to the replica's inbox")
    ap.add_argument("--lag-s", type=float, default=SimConfig.lag_s,
                    help="simulation: seconds the replicas' KV events and reports take to the router")
    ap.add_argument("--router", action="append", default=[], metavar="FIELD=VALUE",
                    help="a RouterConfig setting (e.g. routing_balance_s=0.1) for the simulation and --deploy")
    args = ap.parse_args(argv)
    try:
        router_settings = _router_settings(args.router)
    except ValueError as e:
        ap.error(str(e))
    from ziggurat.cluster.spec import tiny_model_dir

    model = args.model or str(tiny_model_dir())
    policies = [p for p in args.policies.split(",") if p]
    if "oracle" not in policies:
        policies.append("oracle")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = SimConfig(replicas=args.replicas, num_blocks=args.num_blocks, concurrency=args.concurrency,
                    step_s=args.step_s, submit_lag_s=args.submit_lag_s, lag_s=args.lag_s)
    t0 = time.perf_counter()
    if args.url or args.deploy:
        return _main_http(args, model, [p for p in policies if p != "oracle"], seeds, cfg, t0, router_settings)
    rc = RouterConfig(**router_settings)
    results = run_policies(model, policies, seeds, cfg, router_config=rc, real_model=args.real_model)
    if args.restart:
        rcfg = dataclasses.replace(cfg, restart_at=0.5)
        for r in run_policies(model, ["kv-aware"], seeds, rcfg, router_config=rc, real_model=args.real_model):
            r.policy = "kv-aware+restart"
            results.append(r)
    print(f"{cfg.replicas} replicas x {cfg.num_blocks} KV blocks, concurrency {cfg.concurrency}, seeds {seeds}, "
          f"{Workload().num_requests} requests a run ({time.perf_counter() - t0:.0f} s)")
    table = report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    print(json.dumps({p: {k: v for k, v in row.items() if k not in ("runs", "per_replica")}
                      for p, row in table.items()}))
    return 0


def _router_settings(items: list[str]) -> dict:
    """--router FIELD=VALUE pairs as RouterConfig keywords (checked by RouterConfig itself)."""
    fields = {f.name: f.type for f in dataclasses.fields(RouterConfig)}
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or name not in fields or name == "routing_policy":
            raise ValueError(f"--router: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(f for f in fields if f != 'routing_policy')}, got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--router: {name} must be a number, got {value!r}") from None
    RouterConfig(**out)  # bad values are refused here, naming the field
    return out


def _main_http(args, model: str, policies: list[str], seeds: list[int], cfg: SimConfig, t0: float,
               router_settings: dict) -> int:
    import os

    answers = "seeded" if args.seeded_answers else "model"
    results: list[RunResult] = []
    if args.url:
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                print(f"--api-key-env: {args.api_key_env} is not set", file=sys.stderr)
                return 2
        for seed in seeds:
            w = Workload(seed=seed, answers=answers)
            results.append(asyncio.run(drive_http(args.url.rstrip("/"), w, args.label, cfg.concurrency, key)))
            results[-1].moves = None
        where = args.url
    else:
        for p in policies:
            results += deploy_and_run(model, p, seeds, cfg, {"answers": answers}, router_settings=router_settings)
        where = f"a local Ray deployment per policy ({cfg.replicas} replicas of {model}, CPU)"
    results += run_policies(model, ["oracle"], seeds, cfg, workload_kw={"answers": answers})
    print(f"over HTTP against {where}: {cfg.replicas} replicas x {cfg.num_blocks} KV blocks, concurrency "
          f"{cfg.concurrency}, seeds {seeds}, {Workload().num_requests} requests a run; TTFT wall-clock; "
          f"chats' answers {answers}; oracle and % of oracle: the simulation's on the same workload; moves: the router's load "
          f"overrides (--deploy) or - ({time.perf_counter() - t0:.0f} s)")
    table = report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
