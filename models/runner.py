"""ModelRunner: one TP rank's model shard, KV cache and per-request state.

Each step it turns a StepInput (the scheduler's diff) into flat tensors,
runs the forward pass, and on rank 0 samples one token for every request
whose known tokens are now all computed. Sampled ids are broadcast so every
rank's copy of each request's tokens stays identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ziggurat.kernels.attention import AttentionMetadata
from ziggurat.models.config import ModelConfig
from ziggurat.models.loader import load_weights
from ziggurat.models.registry import model_class
from ziggurat.models.sampler import (
    SAMPLING_COLUMNS,
    PenaltyState,
    Sampler,
    SamplingBatch,
    apply_token_bitmask,
    plain_greedy,
    sampling_row,
)
from ziggurat.models.staging import Staging
from ziggurat.models.step import Logprobs, NewRequestData, StepInput, StepOutput
from ziggurat.sampling_params import SamplingParams
from ziggurat.topology.distributed import tp


@dataclass
class _HostStep:
    """One step's inputs on the host, before upload."""

    ids: np.ndarray  # [T] token ids
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] KV slot of each token (its position in the paged cache)
    seq_lens: np.ndarray  # [B] context length after this step
    qsl: np.ndarray  # [B+1] query start offsets
    rows: np.ndarray  # [B] block-table row of each request
    sample_idx: np.ndarray  # token index of each sampling request's last token
    sample_reqs: list["_RunnerRequest"]  # the requests that sample, in batch order
    sample_rows: np.ndarray  # and their rows (models/step.py)
    max_query_len: int
    # Tokens whose id is still on the GPU (sampled by the step in flight):
    # feed_dst[i] (token index here) takes feed_from's sampled row feed_src[i].
    feed_dst: np.ndarray
    feed_src: np.ndarray
    feed_from: "_InFlight | None"
    lora_slots: np.ndarray | None = None  # [T] each token's LoRA slot (-1: none); None: no adapter in the step


@dataclass
class _InFlight:
    """A launched step: its sampled ids on the GPU, on their way to the host."""

    reqs: list["_RunnerRequest"]
    rows: np.ndarray
    tokens: torch.Tensor | None  # [S] int64 on the device (every rank)
    host: torch.Tensor | None  # [S] pinned copy, filled asynchronously
    event: object  # torch.cuda.Event marking the copy's end (None on CPU)
    sampled: object = None  # rank 0: the SamplerOutput (logprobs)
    logprobs_k: list = field(default_factory=list)  # rank 0: each row's requested top-k logprobs (or None)
    output: StepOutput | None = None  # set once resolved
    resolved: bool = False
    logits: torch.Tensor | None = None  # deferred sampling: the logits awaiting their grammar masks

    lora_staged: list | None = None  # rank 0: adapter prefetches done by this step's launch

    @staticmethod
    def empty(lora_staged: list | None = None) -> "_InFlight":
        return _InFlight([], np.zeros(0, dtype=np.int32), None, None, None, output=StepOutput(lora_staged=lora_staged),
                         resolved=True)


@dataclass
class _RunnerRequest:
    prompt_len: int
    token_ids: list[int]  # prompt + generated
    num_blocks: int  # block ids in this request's row of the block table
    params: SamplingParams
    num_computed: int
    row: int  # its row in every per-request table (models/step.py)
    pen_index: int = -1  # its entry in ModelRunner.penalties (rank 0, penalty requests only)
    lora_slot: int = -1  # its adapter's LoRA slot (models/lora.py); -1: the base model
    # Tokens sampled by steps still in flight, oldest first: (step handle, its
    # row there). Their values are on the GPU only. The engine runs at most one
    # step ahead, so a request has at most two.
    pending: list = field(default_factory=list)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, device: torch.device, block_size: int, max_model_len: int, seed: int = 0,
                 lora=None):
        """lora: models.lora.LoRALimits to serve adapters (slots allocated here), or None."""
        self.cfg, self.device, self.block_size = cfg, device, block_size
        self.max_model_len = max_model_len
        self.tp = tp()
        t0 = time.perf_counter()
        with torch.device(device):
            self.model = model_class(cfg)(cfg, max_positions=max_model_len)
        load_weights(self.model, cfg.path)
        self.model.eval()
        self.loras = None  # LoRAManager: adapter slots and their host cache
        self._num_lora = 0  # live requests with an adapter
        if lora is not None:
            from ziggurat.models.lora import LoRAManager

            self.loras = LoRAManager(self.model, lora, device, cfg.dtype)
        self.load_seconds = time.perf_counter() - t0
        self.sampler = Sampler(seed)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.requests: dict[int, _RunnerRequest] = {}  # by row
        self.num_blocks = 0
        # Persistent block table, one row per request row, max_model_len wide:
        # a host copy and its device mirror, which each step updates with just
        # the block ids that step appended (the diff), never rebuilt.
        width = (max_model_len + block_size - 1) // block_size
        self.block_table = np.zeros((64, width), dtype=np.int32)
        self.device_table = torch.zeros(64, width, dtype=torch.int32, device=device)
        self._table_diff: list[np.ndarray] = []  # [row, col, block] triples not yet on the device
        # Sampling parameters, one row per live request (same rows as the block
        # table), on the device: written when a request arrives, gathered by
        # row index each step; never rebuilt from the requests' params.
        self.param_table = torch.zeros(64, len(SAMPLING_COLUMNS), dtype=torch.float32, device=device)
        self._param_diff: dict[int, list[float]] = {}  # row -> values not yet on the device
        self.penalties = PenaltyState(cfg.vocab_size, device)  # device tables, grown on first use
        self.staging = Staging(device)
        self.graphs = None  # DecodeGraphs once captured
        self._num_biased = 0  # requests with a logit_bias among self.requests
        self._stepped = False

    # -- KV cache ----------------------------------------------------------------

    def kv_block_bytes(self) -> int:
        attn = self.model.attention_layers()[0]
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.kv_cache_dtype.itemsize
        return per_token * self.block_size * len(self.model.attention_layers())

    def available_kv_bytes(self, gpu_memory_utilization: float) -> int:
        """GPU: what is left of the budget once weights and a forward's peak are paid."""
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return int(total * gpu_memory_utilization) - used_by_others - peak

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The model's dtype, or float8_e4m3fn with --kv-cache-dtype fp8 (1-byte elements)."""
        return self.cfg.kv_cache_dtype or self.cfg.dtype

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.bind_kv_cache(
                torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device),
                torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device),
            )

    def capture_decode_graphs(self, max_batch: int, capture: bool = True) -> float:
        """Capture CUDA graphs of the decode forward for batches up to max_batch
        (after the KV cache is bound: the graphs hold its addresses). Returns
        seconds. capture=False sets up the padded static inputs alone (CPU tests)."""
        from ziggurat.models.cuda_graph import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.device, max_batch, self.max_model_len, self.block_table.shape[1],
                                   self.staging, self.loras.limits.max_loras if self.loras is not None else 0)
        if capture:
            self.graphs.capture()
        return self.graphs.capture_seconds

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compile the prefill-path kernels before any request does: one forward
        of a fresh prompt, a chunk with context and a decode, built by the
        normal input path for scratch requests that are dropped afterwards.
        Start-up only: it writes the first five KV blocks."""
        if self._stepped:
            raise RuntimeError("warmup() overwrites KV blocks: call it before the first step")
        bs = self.block_size
        if self.num_blocks < 5:
            return
        params = SamplingParams(max_tokens=1)
        # (request, prompt length, block ids, tokens already computed, tokens to run), in rows 0-2
        seqs = [("warmup-prompt", 2 * bs, [0, 1], 0, 2 * bs), ("warmup-chunk", bs + 2, [2, 3], bs, 2),
                ("warmup-decode", 6, [4], 5, 1)]
        step = StepInput(new_requests=[NewRequestData(rid, row, [0] * n, [], params, blocks, done)
                                       for row, (rid, n, blocks, done, _) in enumerate(seqs)],
                         rows=np.arange(len(seqs), dtype=np.int32),
                         num_tokens=np.asarray([run for *_, run in seqs], dtype=np.int32))
        self._update_states(step)
        ids, pos, meta, _ = self._eager_inputs(self._prepare(step))
        self.model(ids, pos, meta)
        if self.loras is not None:  # the LoRA kernels too, over slot 0 (zeros or an adapter: either compiles them)
            self.model(ids, pos, meta, self.loras.batch(np.zeros(len(ids), dtype=np.int64), self.staging))
        self._update_states(StepInput(finished_rows=list(range(len(seqs)))))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def profile_run(self, num_tokens: int) -> None:
        """Run one forward of `num_tokens` prompt tokens on a throwaway cache so
        the allocator's peak includes activations before sizing the KV cache."""
        blocks = (num_tokens + self.block_size - 1) // self.block_size
        self.allocate_kv_cache(blocks)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=pos.clone(),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.long, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.long, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device).unsqueeze(0),
            query_start_loc_cpu=[0, num_tokens],
            seq_lens_cpu=[num_tokens],
            max_query_len=num_tokens,
            max_seq_len=num_tokens,
        )
        with torch.inference_mode():
            h = self.model(ids, pos, meta)
            self.model.compute_logits(h[-256:])
        for attn in self.model.attention_layers():
            attn.bind_kv_cache(None, None)
        self.num_blocks = 0

    # -- one step -----------------------------------------------------------------

    def _update_states(self, step: StepInput) -> None:
        for row in step.finished_rows:
            r = self.requests.pop(row, None)
            if r is not None and r.pen_index >= 0:
                self.penalties.release(r.pen_index)
            if r is not None and r.params.logit_bias:
                self._num_biased -= 1
            if r is not None and r.lora_slot >= 0:
                self.loras.release(r.lora_slot)
                self._num_lora -= 1
        for new in step.new_requests:
            if new.row in self.requests:
                raise RuntimeError(f"request {new.req_id}: row {new.row} is still held")
            self._ensure_rows(new.row + 1)
            r = self.requests[new.row] = _RunnerRequest(
                prompt_len=len(new.prompt_token_ids),
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_blocks=0,
                params=new.sampling_params,
                num_computed=new.num_computed_tokens,
                row=new.row,
            )
            self._append_blocks(r, new.block_ids)
            if new.sampling_params.lora_request is not None:
                self._take_lora_slot(r, new.sampling_params.lora_request)
            self._num_biased += bool(new.sampling_params.logit_bias)
            self._param_diff[r.row] = sampling_row(new.sampling_params)  # a reused row is overwritten
            if new.sampling_params.needs_penalties and self.tp.rank == 0:
                r.pen_index = self.penalties.add(new.prompt_token_ids, new.output_token_ids)
        for c in step.cached_requests:
            r = self.requests[c.row]
            self._append_blocks(r, c.new_block_ids)
            r.num_computed = c.num_computed_tokens

    def _take_lora_slot(self, r: "_RunnerRequest", lora) -> None:
        if self.loras is None:
            raise RuntimeError(f"adapter {lora.lora_name!r}: LoRA is not enabled on this replica (enable_lora)")
        r.lora_slot = self.loras.acquire(lora)
        self._num_lora += 1

    def _ensure_rows(self, n: int) -> None:
        """Tables at least n rows tall (grown by doubling; rare: rows are reused)."""
        old = self.block_table.shape[0]
        if n <= old:
            return
        new = max(2 * old, n)
        self.block_table = np.concatenate([self.block_table, np.zeros((new - old, self.block_table.shape[1]),
                                                                      dtype=self.block_table.dtype)])
        self.device_table = torch.cat([self.device_table, self.device_table.new_zeros(new - old,
                                                                                       self.device_table.shape[1])])
        self.param_table = torch.cat([self.param_table, self.param_table.new_zeros(new - old,
                                                                                   self.param_table.shape[1])])

    def _append_blocks(self, r: "_RunnerRequest", block_ids: list[int]) -> None:
        if block_ids:
            k = len(block_ids)
            cols = np.arange(r.num_blocks, r.num_blocks + k)
            self.block_table[r.row, cols] = block_ids
            self._table_diff.append(np.stack([np.full(k, r.row), cols, np.asarray(block_ids)]))
            r.num_blocks += k

    def _prepare(self, step: StepInput):
        """The step's flat inputs as numpy, vectorized over tokens:

            positions  p = num_computed .. num_computed + n - 1, per request
            slot(p)    = block_table[row, p // block_size] * block_size + p % block_size
        """
        bs = self.block_size
        batch = step.rows.tolist()
        reqs = [self.requests[s] for s in batch]
        n = step.num_tokens.astype(np.int64)
        start = np.fromiter((r.num_computed for r in reqs), dtype=np.int64, count=len(batch))
        end = start + n
        rows = step.rows.astype(np.int64)
        qsl = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(n, out=qsl[1:])
        total = int(qsl[-1])
        positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1] - start, n)
        held = np.fromiter((r.num_blocks for r in reqs), dtype=np.int64, count=len(batch))
        if (end > held * bs).any():  # a scheduler/worker desync would read another request's blocks
            bad = batch[int(np.argmax(end > held * bs))]
            raise RuntimeError(f"row {bad}: positions beyond its {self.requests[bad].num_blocks} KV blocks")
        tok_rows = np.repeat(rows, n)
        kv_slots = self.block_table[tok_rows, positions // bs].astype(np.int64) * bs + positions % bs
        have = np.fromiter((len(r.token_ids) for r in reqs), dtype=np.int64, count=len(batch))
        pend = np.fromiter((len(r.pending) for r in reqs), dtype=np.int64, count=len(batch))
        known = have + pend
        if (end > known).any():
            bad = batch[int(np.argmax(end > known))]
            raise RuntimeError(f"row {bad}: scheduled past its known tokens")
        # Pending tokens (sampled by a step in flight) can only be the last
        # ones scheduled: their ids are filled in on the GPU from that step's
        # output, never waited for here. Placeholders (0) hold their places.
        feed = np.nonzero(end > have)[0]
        if total == len(reqs):  # decode: one token each
            ids = np.fromiter((r.token_ids[a] if a < h else 0 for r, a, h in zip(reqs, start.tolist(), have.tolist())),
                              dtype=np.int64, count=total)
        else:
            ids_list: list[int] = []
            for r, a, b in zip(reqs, start.tolist(), end.tolist()):
                ids_list.extend(r.token_ids[a:b])
                ids_list.extend([0] * (b - max(a, len(r.token_ids))) if b > len(r.token_ids) else ())
            ids = np.asarray(ids_list, dtype=np.int64)
        feed_from, dst, src = None, [], []
        for i in feed.tolist():
            r, a, b, h = reqs[i], int(start[i]), int(end[i]), int(have[i])
            for p in range(max(a, h), b):
                handle, row = r.pending[p - h]
                if feed_from is None:
                    feed_from = handle
                elif handle is not feed_from:
                    raise RuntimeError("inputs pending from two steps in flight")
                dst.append(int(qsl[i]) + p - a)
                src.append(row)
        # Requests whose known tokens are all computed after this step sample.
        sampling = np.nonzero(end == known)[0]
        lora_slots = None
        if self._num_lora:
            per_req = np.fromiter((r.lora_slot for r in reqs), dtype=np.int64, count=len(reqs))
            if (per_req >= 0).any():
                lora_slots = np.repeat(per_req, n)
        return _HostStep(ids, positions, kv_slots, end, qsl, rows, qsl[1:][sampling] - 1,
                         [reqs[i] for i in sampling.tolist()], step.rows[sampling], int(n.max()),
                         np.asarray(dst, dtype=np.int64), np.asarray(src, dtype=np.int64), feed_from, lora_slots)

    def _advance(self, step: StepInput) -> None:
        """After a step is prepared: each request's computed count moves past its
        scheduled tokens (the scheduler sends the count only with new blocks)."""
        reqs = self.requests
        for row, n in step.scheduled():
            reqs[row].num_computed += n

    def _apply_table_diff(self) -> None:
        if self._table_diff:
            d = np.concatenate(self._table_diff, axis=1)
            self._table_diff = []
            r, c, blk = self.staging.upload(d[0], d[1], d[2])
            self.device_table[r, c] = blk.to(torch.int32)

    def _eager_inputs(self, hs: "_HostStep"):
        """Device inputs for an eager forward: (ids, positions, metadata, sample_idx)."""
        self._apply_table_diff()
        ids, pos, slots, seq_lens, qsl, rows, sample_idx = self.staging.upload(
            hs.ids, hs.positions, hs.slot_mapping, hs.seq_lens, hs.qsl, hs.rows, hs.sample_idx)
        width = int((hs.seq_lens.max() + self.block_size - 1) // self.block_size)
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=self.device_table[rows, :width],
            query_start_loc_cpu=hs.qsl.tolist(),
            seq_lens_cpu=hs.seq_lens.tolist(),
            max_query_len=hs.max_query_len,
            max_seq_len=int(hs.seq_lens.max()),
        )
        return ids, pos, meta, sample_idx

    def _feedback(self, hs: "_HostStep"):
        """(token indices, ids) for the tokens the step in flight sampled, both on the device."""
        if not len(hs.feed_dst):
            return None
        if hs.feed_from.tokens is None:
            raise RuntimeError("inputs pending from a step whose sampling was deferred and not done")
        dst, src = self.staging.upload(hs.feed_dst, hs.feed_src)
        return dst, hs.feed_from.tokens[src]

    def _forward(self, hs: "_HostStep") -> torch.Tensor:
        """Hidden states of the rows that sample: a decode batch that fits a
        captured graph replays it; anything else runs eagerly."""
        if hs.max_query_len == 1 and self.graphs is not None and len(hs.rows) <= self.graphs.max_batch:
            self._apply_table_diff()
            return self.graphs.run(hs.ids, hs.positions, hs.slot_mapping, hs.seq_lens, hs.rows, self.device_table,
                                   self._feedback(hs), hs.lora_slots)
        ids, pos, meta, sample_idx = self._eager_inputs(hs)
        fb = self._feedback(hs)
        if fb is not None:
            ids.index_copy_(0, *fb)
        lora = self.loras.batch(hs.lora_slots, self.staging) if hs.lora_slots is not None else None
        hidden = self.model(ids, pos, meta, lora)
        return hidden if len(hs.sample_idx) == len(hs.ids) else hidden[sample_idx]

    def execute(self, step: StepInput) -> StepOutput | None:
        """Run one step to the end. Returns the sampled tokens on rank 0, None on other ranks."""
        return self.wait(self.execute_async(step))

    @torch.inference_mode()
    def execute_async(self, step: StepInput) -> _InFlight:
        """Launch one step and return without waiting for the GPU. The next
        step may be launched before this one is waited for: tokens it samples
        feed that step's inputs on the GPU (see _prepare).

        A step whose grammar masks are not known yet (step.defers_sampling)
        launches its forward only; sample_deferred() then masks and samples it,
        so the host fills the masks while the GPU runs the forward."""
        self._stepped = True
        if step.lora_prefetch and self.loras is not None:
            for lr in step.lora_prefetch:
                self.loras.prefetch(lr)
        self._update_states(step)
        staged = self.loras.staged_since() if self.loras is not None and self.tp.rank == 0 else None
        if step.is_empty:
            return _InFlight.empty(staged)
        hs = self._prepare(step)
        self._advance(step)
        hidden = self._forward(hs)
        reqs = hs.sample_reqs
        if not reqs:
            return _InFlight.empty(staged)
        logits = self.model.compute_logits(hidden)
        if self.tp.rank == 0 and self._num_biased:
            self._add_logit_bias(logits, reqs)
        # tokens (set when sampled, before any later step is prepared) feed later steps' inputs.
        handle = _InFlight(reqs, hs.sample_rows, None, None, None, lora_staged=staged)
        for i, r in enumerate(reqs):
            r.pending.append((handle, i))
        if step.defers_sampling:
            handle.logits = logits
            return handle
        self._sample_into(handle, logits, step.grammar_rows, step.grammar_bitmask)
        return handle

    @torch.inference_mode()
    def sample_deferred(self, handle: _InFlight, masks) -> None:
        """Mask (masks: models/step.py::GrammarMasks, rank 0) and sample a step launched with
        deferred sampling; every rank calls it (the sampled ids are broadcast)."""
        logits = handle.logits
        if logits is None:
            raise RuntimeError("sample_deferred: the step was not launched with deferred sampling, or was sampled")
        handle.logits = None
        rows, bitmask = (masks.rows, masks.bitmask) if masks is not None else (None, None)
        self._sample_into(handle, logits, rows, bitmask)

    def _sample_into(self, handle: _InFlight, logits: torch.Tensor, grammar_rows, grammar_bitmask) -> None:
        reqs = handle.reqs
        if grammar_bitmask is not None and self.tp.rank == 0:
            self._mask_grammar_rows(logits, reqs, grammar_rows, grammar_bitmask)
        sampled = self._sample(logits, reqs) if self.tp.rank == 0 else None
        tokens = sampled.token_ids if sampled is not None else torch.empty(len(reqs), dtype=torch.long,
                                                                          device=self.device)
        if self.tp.size > 1:
            dist.broadcast(tokens, src=0, group=self.tp.group)
        if self.device.type == "cuda":
            host = torch.empty(len(reqs), dtype=torch.long, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tokens, None
        handle.tokens, handle.host, handle.event, handle.sampled = tokens, host, event, sampled
        handle.logprobs_k = [r.params.logprobs for r in reqs] if sampled is not None else []

    def wait(self, handle: _InFlight) -> StepOutput | None:
        """The step's sampled tokens (rank 0; None elsewhere), once the GPU is done."""
        self._resolve(handle)
        return handle.output if self.tp.rank == 0 else None

    def _resolve(self, h: _InFlight) -> None:
        if h.resolved:
            return
        if h.host is None:
            raise RuntimeError("a step with deferred sampling is waited for before sample_deferred()")
        if h.event is not None:
            h.event.synchronize()
        token_ids = h.host.tolist()
        for r, t in zip(h.reqs, token_ids):
            if r.pending and r.pending[0][0] is h:  # (a request finished or preempted meanwhile is just dropped)
                r.token_ids.append(t)
                r.pending.pop(0)
        if self.tp.rank == 0:
            h.output = self._step_output(h.rows, token_ids, h.sampled, h.logprobs_k)
            h.output.lora_staged = h.lora_staged
        h.reqs = []
        h.tokens = h.sampled = None  # free the device tensors
        h.resolved = True

    def _add_logit_bias(self, logits: torch.Tensor, reqs: list[_RunnerRequest]) -> None:
        """OpenAI's logit_bias: each biased request's (token, bias) pairs added to its row,
        one upload and one scatter for the batch."""
        rows, ids, vals = [], [], []
        for i, r in enumerate(reqs):
            b = r.params.logit_bias
            if b:
                rows.extend([i] * len(b))
                ids.extend(b.keys())
                vals.extend(b.values())
        if not rows:
            return
        r_t, i_t = self.staging.upload(np.asarray(rows, dtype=np.int64), np.asarray(ids, dtype=np.int64))
        v_t = torch.tensor(vals, dtype=logits.dtype).to(self.device, non_blocking=True)
        logits.index_put_((r_t, i_t), v_t, accumulate=True)

    def _mask_grammar_rows(self, logits: torch.Tensor, reqs: list[_RunnerRequest], grammar_rows: np.ndarray,
                           grammar_bitmask: np.ndarray) -> None:
        """Structured outputs: disallowed tokens of the grammar rows to -inf before sampling."""
        where = {r.row: i for i, r in enumerate(reqs)}
        listed = grammar_rows.tolist()
        keep = [j for j, row in enumerate(listed) if row in where]
        if not keep:
            return
        positions = [where[listed[j]] for j in keep]
        mask = grammar_bitmask if len(keep) == len(listed) else grammar_bitmask[keep]
        (pos,) = self.staging.upload(np.asarray(positions, dtype=np.int64))
        apply_token_bitmask(logits, self._upload_mask(np.ascontiguousarray(mask, dtype=np.int32)), pos)

    def _upload_mask(self, mask: np.ndarray) -> torch.Tensor:
        """The bitmask on the device, through two pinned buffers used in turn (a step may be
        launched while the previous one's upload is still queued behind its forward)."""
        if self.device.type != "cuda":
            return torch.from_numpy(mask)
        k, w = mask.shape
        bufs = getattr(self, "_mask_bufs", None)
        if bufs is None or bufs[0][0].shape[0] < k or bufs[0][0].shape[1] != w:
            rows = max(k, 64)
            bufs = self._mask_bufs = [(torch.empty((rows, w), dtype=torch.int32, pin_memory=True),
                                       torch.empty((rows, w), dtype=torch.int32, device=self.device)) for _ in range(2)]
            self._mask_turn = 0
        host, dev = bufs[self._mask_turn]
        self._mask_turn ^= 1
        host[:k].numpy()[:] = mask
        dev[:k].copy_(host[:k], non_blocking=True)
        return dev[:k]

    def _sample(self, logits: torch.Tensor, rs: list[_RunnerRequest]):
        """SamplerOutput for the sampling rows, on the device (no host sync)."""
        # The sampler reads only output counts from these (min_tokens, seeded
        # steps): the pending token counts; penalties come from device tables.
        outputs = [range(len(r.token_ids) + len(r.pending) - r.prompt_len) for r in rs]
        params = [r.params for r in rs]
        rows = pen = None
        if not all(map(plain_greedy, params)):  # the per-row parameter columns are read
            self._apply_param_diff()
            (rows,) = self.staging.upload(np.fromiter((r.row for r in rs), dtype=np.int64, count=len(rs)))
        pen_rows = [i for i, r in enumerate(rs) if r.pen_index >= 0]
        if pen_rows:
            # Rows without penalties read entry 0: their penalties are neutral.
            entries, pen_idx, pen_entries = self.staging.upload(
                np.fromiter((max(r.pen_index, 0) for r in rs), dtype=np.int64, count=len(rs)),
                np.asarray(pen_rows, dtype=np.int64), np.asarray([rs[i].pen_index for i in pen_rows], dtype=np.int64))
            pen = self.penalties.gather(entries)
        batch = SamplingBatch.build(params, [()] * len(rs), outputs, self.cfg.vocab_size, self.device,
                                    param_table=self.param_table, param_rows=rows, penalty_tensors=pen)
        out = self.sampler(logits, batch, self.generator)
        if pen_rows:
            self.penalties.bump(pen_entries, out.token_ids.index_select(0, pen_idx))
        return out

    def _apply_param_diff(self) -> None:
        """New requests' sampling parameters into their rows of the device table (one small copy)."""
        if self._param_diff:
            rows = torch.tensor(list(self._param_diff), dtype=torch.long)
            vals = torch.tensor(list(self._param_diff.values()), dtype=torch.float32)
            self._param_diff = {}
            if self.device.type == "cuda":
                rows, vals = rows.pin_memory(), vals.pin_memory()
            self.param_table[rows.to(self.device, non_blocking=True)] = vals.to(self.device, non_blocking=True)

    @staticmethod
    def _step_output(rows: np.ndarray, token_ids: list[int], s, logprobs_k: list) -> StepOutput:
        lps: list[Logprobs | None] | None = None
        if s is not None and s.logprobs is not None:
            lps = [None] * len(rows)
            lp, ranks = s.logprobs.tolist(), s.ranks.tolist()
            top_ids = s.topk_ids.tolist() if s.topk_ids is not None else None
            top_lps = s.topk_logprobs.tolist() if s.topk_logprobs is not None else None
            for i, k in enumerate(logprobs_k):
                if k is None:
                    continue
                lps[i] = Logprobs(
                    token_id=token_ids[i],
                    logprob=lp[i],
                    rank=ranks[i],
                    top_ids=top_ids[i][:k] if top_ids else [],
                    top_logprobs=top_lps[i][:k] if top_lps else [],
                )
        return StepOutput(rows, np.asarray(token_ids, dtype=np.int32), lps)
