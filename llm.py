"""The offline API for driver scripts.

    from ziggurat import LLM, SamplingParams
    llm = LLM(model_dir, tensor_parallel_size=1)
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))

generate() runs the engine loop in this process until every request is done.
"""

from __future__ import annotations

from ziggurat.actors.scheduler.engine import EngineCore
from ziggurat.actors.scheduler.output_processor import RequestOutputs
from ziggurat.actors.scheduler.request import RequestStatus
from ziggurat.actors.scheduler.validation import RequestError
from ziggurat.config import EngineConfig
from ziggurat.models.config import sampling_defaults
from ziggurat.models.tokenizer import Tokenizer
from ziggurat.outputs import RequestOutput
from ziggurat.sampling_params import LoRARequest, SamplingParams

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
        self._defaults = sampling_defaults(model)
        self._counter = 0

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied (vLLM's rule)."""
        return SamplingParams(**self._defaults)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's LLM.chat: one conversation (a list of messages) or several, rendered with
        the model's chat template (or `chat_template`), then generated like `generate`."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a conversation (a list of messages) or a list of them")
        convs = messages if isinstance(messages[0], list) else [messages]
        kw = dict(chat_template_kwargs or {})
        if tools is not None:
            kw["tools"] = tools
        prompts = []
        for i, conv in enumerate(convs):
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m for m in conv):
                raise ValueError(f"messages[{i}]: a conversation is a list of {{'role', 'content'}} messages")
            text = (self.tokenizer.render_template(chat_template, conv, add_generation_prompt, **kw) if chat_template
                    else self.tokenizer.apply_chat_template(conv, add_generation_prompt, **kw))
            prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False), "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """use_tqdm: a progress bar (requests done, tokens/s in and out) on runs longer
        than a second; False silences it. lora_request: the adapter for every prompt, or
        one per prompt (None: the base model); needs LLM(..., enable_lora=True)."""
        if self.engine is None:
            raise RuntimeError("this LLM has been shut down; make a new one")
        prompts = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts; pass one or one per prompt"
            )
        if lora_request is not None:
            sampling_params = self._with_lora(sampling_params, lora_request)
        # Validate and tokenize everything before adding anything, so a bad
        # prompt leaves the engine untouched.
        encoded = [self._encode(p) for p in prompts]
        for i, ((ids, _), params) in enumerate(zip(encoded, sampling_params)):
            try:
                self.engine.check_request(ids, params)
            except RequestError as e:
                if e.param == "model":
                    raise ValueError(f"lora_request: {e.message.removeprefix('model: ')}") from None
                raise ValueError(f"prompt {i}: {e.message.removeprefix('prompt: ')}") from None
        groups: list[RequestOutputs] = []
        by_id: dict[str, tuple[RequestOutputs, int]] = {}  # engine request -> (its request, sample index)
        for ids, params in ((ids, params) for (ids, _), params in zip(encoded, sampling_params)):
            group = RequestOutputs(str(self._counter), [ids], params, self.tokenizer)
            self._counter += 1
            groups.append(group)
            for s in group.samples:
                by_id[s.request_id] = (group, s.index)
                self.engine.add_request(ids, s.params, request_id=s.request_id)
        bar = _Progress(len(groups), sum(len(ids) for ids, _ in encoded)) if use_tqdm else None
        try:
            self._run(by_id, bar)
        except BaseException:
            self.engine.abort(list(by_id))
            raise
        finally:
            if bar is not None:
                bar.close()
        return [g.to_request_output(text) for g, (_, text) in zip(groups, encoded)]

    def _run(self, by_id: dict[str, tuple[RequestOutputs, int]], bar=None) -> None:
        pending = set(by_id)
        while pending:
            for u in self.engine.step():
                group, index = by_id[u.request_id]
                delta = group.apply(index, u)
                if delta is None:
                    continue
                if delta.stop_now:
                    self.engine.abort([u.request_id], RequestStatus.FINISHED_STOPPED)
                if delta.finished:
                    pending.discard(u.request_id)
                    if bar is not None and group.finished:
                        bar.done(group.completion_tokens)

    def _with_lora(self, params: list[SamplingParams], lora) -> list[SamplingParams]:
        """Each prompt's params carrying its adapter, checked against the model once (errors name the file)."""
        from ziggurat.models.lora import LoRAError, check_adapter

        loras = lora if isinstance(lora, list) else [lora] * len(params)
        if len(loras) != len(params):
            raise ValueError(f"lora_request: got {len(loras)} for {len(params)} prompts; pass one or one per prompt")
        out, checked = [], {}
        for p, lr in zip(params, loras):
            if lr is None:
                out.append(p)
                continue
            if not isinstance(lr, LoRARequest):
                raise ValueError(f"lora_request: expected a LoRARequest, got {type(lr).__name__}")
            if lr.key not in checked:
                try:
                    rank = check_adapter(lr.lora_path, self.engine.model_config).rank
                except LoRAError as e:
                    raise ValueError(f"lora_request: {e}") from None
                checked[lr.key] = LoRARequest(lr.lora_name, lr.lora_int_id, lr.lora_path, rank)
            out.append(p.clone(lora_request=checked[lr.key]))
        return out

    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts: expected a string, a list of token ids, or a non-empty list of those")
        return list(prompts)

    def _encode(self, p) -> tuple[list[int], str | None]:
        text = None
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                text = p.get("prompt")  # LLM.chat passes the rendered text along
                p = p["prompt_token_ids"]
                if not isinstance(p, (list, tuple)):
                    raise ValueError(f"prompt_token_ids: expected a list of token ids, got {type(p).__name__}")
                p = list(p)
            elif "prompt" in p:
                p = p["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(p, str):
            return self.tokenizer.encode(p), p
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p), text  # its ids are checked with the rest (validation.py)
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(p).__name__}")

    def shutdown(self) -> None:
        """Release the model, the KV cache and any worker processes; the GPU memory
        goes back to the device. Idempotent; `with LLM(...) as llm:` calls it on exit."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


class _Progress:
    """The offline progress bar (tqdm): requests done of all, input and output tokens/s."""

    def __init__(self, total: int, prompt_tokens: int):
        import time

        from tqdm.auto import tqdm

        self._time = time.perf_counter
        self.t0, self.prompt_tokens, self.out = self._time(), prompt_tokens, 0
        self.bar = tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True, delay=1.0)

    def done(self, completion_tokens_so_far: int) -> None:
        self.out += completion_tokens_so_far
        dt = max(self._time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"in: {self.prompt_tokens / dt:.0f} tok/s, out: {self.out / dt:.0f} tok/s",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
