"""The offline API for driver scripts.

    from ziggurat import LLM, SamplingParams
    llm = LLM(model_dir, tensor_parallel_size=1)
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))

generate() runs the engine loop in this process until every request is done.
"""

from __future__ import annotations

from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.request import RequestStatus, prompt_error
from ziggurat.config import EngineConfig
from ziggurat.models.tokenizer import TextStream, Tokenizer
from ziggurat.outputs import CompletionOutput, RequestOutput
from ziggurat.sampling_params import SamplingParams

PromptType = str | list[int] | dict


# Offline runs favour throughput over inter-token latency: a larger per-step
# token budget means fewer, larger prefill chunks (H100, 32 x 4096/32:
# 31,9xx total tok/s at 16384 vs 30,903 at 8192; BENCHMARKS.md). Serving keeps
# EngineConfig's 8192, which bounds how long a prefill chunk stalls decodes.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 16384


class LLM:
    def __init__(self, model: str, tensor_parallel_size: int = 1, dtype: str | None = None, seed: int = 0, **kwargs):
        kwargs.setdefault("max_num_batched_tokens", OFFLINE_MAX_NUM_BATCHED_TOKENS)
        self.config = EngineConfig(model=str(model), tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed, **kwargs)
        self.tokenizer = Tokenizer(model)
        self.engine = EngineCore(self.config)
        self._counter = 0

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompts = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts; pass one or one per prompt"
            )
        # Validate and tokenize everything before adding anything, so a bad
        # prompt leaves the engine untouched.
        encoded = [self._encode(p) for p in prompts]
        for i, (ids, _) in enumerate(encoded):
            err = prompt_error(ids, self.engine.max_model_len, self.engine.model_config.vocab_size)
            if err is not None:
                raise ValueError(f"prompt {i}: {err[0].removeprefix('prompt: ')}")
        results: list[RequestOutput] = []
        streams: dict[str, tuple[RequestOutput, CompletionOutput, TextStream, SamplingParams]] = {}
        for (ids, text), params in zip(encoded, sampling_params):
            rid = str(self._counter)
            self._counter += 1
            ro = RequestOutput(request_id=rid, prompt=text, prompt_token_ids=ids)
            results.append(ro)
            for i in range(params.n):
                child = params.for_child(i)
                co = CompletionOutput(index=i, text="", token_ids=[], finish_reason=None,
                                      logprobs=[] if params.logprobs is not None else None,
                                      cumulative_logprob=0.0 if params.logprobs is not None else None)
                ro.outputs.append(co)
                stream = TextStream(self.tokenizer, ids, params.stop, params.skip_special_tokens,
                                    params.include_stop_str_in_output)
                cid = f"{rid}-{i}"
                streams[cid] = (ro, co, stream, child)
                self.engine.add_request(ids, child, request_id=cid)
        try:
            self._run(streams)
        except BaseException:
            self.engine.abort(list(streams))
            raise
        for ro in results:
            ro.finished = True
        return results

    def _run(self, streams) -> None:
        pending = set(streams)
        while pending:
            for u in self.engine.step():
                ro, co, stream, params = streams[u.request_id]
                co.token_ids.extend(u.new_token_ids)
                for lp in u.new_logprobs:
                    co.logprobs.append({lp.token_id: lp.logprob, **dict(zip(lp.top_ids, lp.top_logprobs))})
                    co.cumulative_logprob += lp.logprob
                ro.num_cached_tokens = u.num_cached_tokens
                co.text += stream.add(u.new_token_ids, final=u.finish_reason is not None)
                if stream.stopped and u.finish_reason is None:
                    self.engine.abort([u.request_id], RequestStatus.FINISHED_STOPPED)
                    co.finish_reason, co.stop_reason = "stop", stream.stop_reason
                elif u.finish_reason is not None:
                    co.finish_reason, co.stop_reason = u.finish_reason, stream.stop_reason or u.stop_reason
                    if stream.stopped:
                        co.finish_reason = "stop"
                if co.finish_reason is not None:
                    pending.discard(u.request_id)

    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts: expected a string, a list of token ids, or a non-empty list of those")
        return list(prompts)

    def _encode(self, p) -> tuple[list[int], str | None]:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                p = list(p["prompt_token_ids"])
            elif "prompt" in p:
                p = p["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(p, str):
            return self.tokenizer.encode(p), p
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = self.engine.model_config.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
            if not p:
                raise ValueError("prompt: must contain at least one token")
            return list(p), None
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(p).__name__}")

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass
