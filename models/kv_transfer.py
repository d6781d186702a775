"""KV transfer between replicas, worker side: a prefill rank's blocks into a decode rank's cache.

The destination pulls. Its scheduler has allocated the blocks (after its own
prefix-cache hits) and sends each of its ranks the same KVPull list; each
rank works out which source ranks hold its heads (kv_blocks.head_plan) and
copies, by the backend topology/kv_transport.py chooses:

    local  the source is in this process (tests): a copy between the two caches
    ipc    same host: the source's cache tensors, mapped once through CUDA IPC, are
           read directly; one kernel launch per source rank copies all layers and
           blocks of every pull in the call (kernels/kv_copy_triton.py)
    group  a two-rank process group with the source rank (gloo on CPU, NCCL between
           GPUs); the source's KVServer thread answers: header, block ids -> packed KV

Pulls run off the step path (the worker actor's "kv" concurrency group) on
their own CUDA stream: the blocks involved are not touched by either side's
forward (the source holds them for the transfer, the destination has not
scheduled their request yet). A pull returns only once its data is in place,
so the destination's scheduler may schedule the request next.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict

import torch

from ziggurat.models.kv_blocks import block_bytes, cache_tensors, copy_blocks, gather_blocks, head_plan, scatter_blocks
from ziggurat.models.step import KVEndpoint, KVPull, KVTransferRecord
from ziggurat.topology import kv_transport as kt

log = logging.getLogger("ziggurat.kv")

# Caches of the source ranks living in this process (the "local" backend), by endpoint key.
_LOCAL: dict[str, object] = {}

_HEADER = 3  # n_blocks (-1: close), head_lo, num_heads


class KVSide:
    """One rank's end of transfers: it serves its blocks to pullers (source) and pulls (destination)."""

    def __init__(self, model, device: torch.device, rank: int, tp_size: int, num_kv_heads: int,
                 timeout_s: float = 30.0, host: str | None = None):
        self.model, self.device = model, device
        self.rank, self.tp_size, self.num_kv_heads = rank, tp_size, num_kv_heads
        self.timeout_s = timeout_s
        self.location = kt.here(device, host)
        self.key = f"{uuid.uuid4().hex[:12]}/{rank}"
        self._store: kt.PairStore | None = None
        self._ipc: dict[str, list] = {}  # source key -> its caches mapped here
        self._tables: dict[str, torch.Tensor] = {}  # source key -> its address table on our device
        self._groups: dict[str, object] = {}  # source key -> our pair group with it
        self._lock = kt.Once()
        self._ids = None  # (pinned host, device) int32 id buffers of the copy kernel (kv_copy_triton.pack_ids)
        self._serving: list[threading.Thread] = []
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.request_pair = None  # (endpoint, pair_id) -> None: asks the source to join (the worker actor sets it)

    # -- source side ---------------------------------------------------------------------

    def endpoint(self, worker=None) -> KVEndpoint:
        caches = cache_tensors(self.model)
        _LOCAL[self.key] = self
        ipc = None
        if self.device.type == "cuda":
            ipc = kt.export_ipc([t for kv in caches for t in kv])
        if self._store is None:
            self._store = kt.PairStore(self.location.host, self.timeout_s)
        return KVEndpoint(self.key, self.rank, self.tp_size, self.num_kv_heads, self.location, ipc,
                          self._store.address, worker)

    def serve(self, pair_id: str, backend: str) -> None:
        """Join pair group `pair_id` as its source and answer pulls on a thread until closed."""
        t = threading.Thread(target=self._serve, args=(pair_id, backend), name=f"kv-serve-{pair_id[:8]}", daemon=True)
        t.start()
        self._serving.append(t)

    def _serve(self, pair_id: str, backend: str) -> None:
        try:
            pg = kt.pair_group(self._store.address, pair_id, 0, backend, self.timeout_s, store=self._store.store)
            dev = self.device if backend == "nccl" else torch.device("cpu")
            caches = cache_tensors(self.model)
            while True:
                hdr = torch.empty(_HEADER, dtype=torch.int64, device=dev)
                pg.recv([hdr], 1, 0).wait()
                n, lo, nh = hdr.tolist()
                if n < 0:
                    return
                ids = torch.empty(n, dtype=torch.int64, device=dev)
                pg.recv([ids], 1, 1).wait()
                packed = gather_blocks(caches, ids.tolist(), lo, nh)
                if packed.device != dev:
                    packed = packed.to(dev)
                pg.send([packed], 1, 2).wait()
        except Exception as e:  # the peer went away or timed out: the pair is over
            log.info("KV pair %s closed (%s)", pair_id[:8], type(e).__name__)

    # -- destination side ----------------------------------------------------------------

    def pull(self, pulls: list[KVPull]) -> list[KVTransferRecord]:
        """Copy every pull's blocks (our heads) into our cache; one record per pull.
        A pull that fails has its record's `error` set; the others still land.
        IPC pulls are batched (one launch per source rank and head slice) and
        each is timed as the whole batch."""
        dst = cache_tensors(self.model)
        rows = []  # [request_id, backend, blocks, bytes, seconds, error]
        ipc = defaultdict(list)  # source key -> [(endpoint, pull, slice, row)]
        for p in pulls:
            plan = head_plan(self.rank, self.tp_size, p.sources[0].tp_size, self.num_kv_heads)
            row = [p.request_id, "", len(p.dst_block_ids), 0, 0.0, None]
            rows.append(row)
            t0 = time.perf_counter()
            try:
                for sl in plan:
                    src = p.sources[sl.src_rank]
                    row[1] = kt.choose(src.location, self.location)
                    row[3] += len(p.dst_block_ids) * block_bytes(dst, sl.num_heads)
                    if row[1] == "ipc":
                        ipc[src.key].append((src, p, sl, row))
                    else:
                        self._copy_now(row[1], src, p, sl, dst)
            except Exception as e:
                row[5] = f"{type(e).__name__}: {e}"
                log.warning("KV pull of %s failed: %s", p.request_id, row[5])
            row[4] = time.perf_counter() - t0
        if ipc:
            self._copy_ipc(ipc, dst)
        return [KVTransferRecord(*r) for r in rows]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # a pull returns with its data in place

    def _copy_now(self, backend: str, src: KVEndpoint, p: KVPull, sl, dst) -> None:
        if backend == "local":
            peer = _LOCAL.get(src.key)
            if peer is None:
                raise RuntimeError(f"source {src.key} is gone")
            copy_blocks(cache_tensors(peer.model), dst, p.src_block_ids, p.dst_block_ids, sl)
            self._sync()
            return
        pg, dev = self._group(src)
        with self._lock(src.key):
            hdr = torch.tensor([len(p.src_block_ids), sl.src_lo, sl.num_heads], dtype=torch.int64, device=dev)
            pg.send([hdr], 0, 0).wait()
            pg.send([torch.tensor(p.src_block_ids, dtype=torch.int64, device=dev)], 0, 1).wait()
            k0 = dst[0][0]
            packed = torch.empty((len(dst), 2, len(p.src_block_ids), k0.shape[1], sl.num_heads, k0.shape[3]),
                                 dtype=k0.dtype, device=dev)
            pg.recv([packed], 0, 2).wait()
        scatter_blocks(dst, packed, p.dst_block_ids, sl.dst_lo)
        self._sync()

    def _group(self, src: KVEndpoint):
        backend = kt.group_backend(self.location.device if src.location.device == self.location.device else "cpu")
        dev = self.device if backend == "nccl" else torch.device("cpu")
        with self._lock(("pair", src.key)):
            pg = self._groups.get(src.key)
            if pg is None:
                if self.request_pair is None or src.store_address is None:
                    raise RuntimeError(f"no way to reach source {src.key}")
                pair_id = uuid.uuid4().hex
                self.request_pair(src, pair_id, backend)
                pg = self._groups[src.key] = kt.pair_group(src.store_address, pair_id, 1, backend, self.timeout_s)
        return pg, dev

    def _copy_ipc(self, by_source, dst) -> None:
        t0 = time.perf_counter()
        done = []
        with torch.cuda.stream(self._stream):
            for key, items in by_source.items():
                src = items[0][0]
                try:
                    caches = self._ipc.get(key)
                    if caches is None:
                        flat = kt.open_ipc(src.ipc_handles, src.location, self.location)
                        caches = self._ipc[key] = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
                    by_slice = defaultdict(lambda: ([], []))
                    for _, p, sl, row in items:
                        if row[5] is None:
                            s, d = by_slice[sl]
                            s.extend(p.src_block_ids)
                            d.extend(p.dst_block_ids)
                    for sl, (s, d) in by_slice.items():
                        self._copy_device(key, caches, dst, s, d, sl)
                    done.extend(row for *_, row in items)
                except Exception as e:
                    log.warning("KV pull over IPC from %s failed: %s", key, e)
                    for *_, row in items:
                        row[5] = row[5] or f"{type(e).__name__}: {e}"
        self._stream.synchronize()
        seconds = time.perf_counter() - t0
        for row in done:
            row[4] += seconds

    def _copy_device(self, key: str, caches, dst, src_ids, dst_ids, sl) -> None:
        """One launch for all layers (the Triton kernel, with both sides' address tables
        uploaded once per source and the ids through one pinned staging buffer), or the
        torch reference. The caches' layout is checked once per source, not per pull."""
        from ziggurat.kernels.backend import use_triton

        if not use_triton(dst[0][0]):
            return copy_blocks(caches, dst, src_ids, dst_ids, sl)
        from ziggurat.kernels import kv_copy_triton as kc

        if key not in self._tables:
            kc.check_caches(caches, dst)
            self._tables[key] = kc.address_table(caches, self.device)
        if "" not in self._tables:
            self._tables[""] = kc.address_table(dst, self.device)
        n = len(src_ids)
        if self._ids is None or self._ids[0].numel() < 1 + 2 * n:
            cap = max(4096, n)
            self._ids = (torch.zeros(1 + 2 * cap, dtype=torch.int32, pin_memory=True),
                         torch.zeros(1 + 2 * cap, dtype=torch.int32, device=self.device))
        host, dev = self._ids
        cap = (host.numel() - 1) // 2
        kc.pack_ids(src_ids, dst_ids, cap, host)
        dev[: 1 + cap + n].copy_(host[: 1 + cap + n], non_blocking=True)  # reused only after the pull's stream sync
        kc.launch(caches, dst, sl.src_lo, sl.dst_lo, sl.num_heads, self._tables[key], self._tables[""], dev, cap, n)

    def warmup(self) -> None:
        """Compile the copy kernel before the first pull waits on it (a copy of block 0 onto itself)."""
        if self.device.type == "cuda":
            from ziggurat.models.kv_blocks import HeadSlice

            dst = cache_tensors(self.model)
            with torch.cuda.stream(self._stream):
                self._copy_device("", dst, dst, [0], [0], HeadSlice(0, 0, 0, dst[0][0].shape[2]))
            self._stream.synchronize()

    def forget(self, source_keys) -> None:
        """Drop mappings and groups of sources that are gone (their replica was rebuilt)."""
        for key in source_keys:
            self._ipc.pop(key, None)
            self._tables.pop(key, None)

            self._groups.pop(key, None)

    def close(self) -> None:
        _LOCAL.pop(self.key, None)

