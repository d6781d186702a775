"""Per-request sampling parameters (the engine's own, mirrored by the HTTP API)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


class SamplingParamsError(ValueError):
    """Raised for an invalid sampling value; `field` names the offending field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output (vLLM's shape): a JSON schema, any JSON object, a regex, one
    of `choice`, or an EBNF grammar; at most one. Compiled and checked by the engine
    (actors/scheduler/structured.py); the HTTP API maps response_format and vLLM's
    guided_* fields onto this."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def as_body(self) -> dict:
        """The request-body form (`{"structured_outputs": {...}}`) the grammar layer parses."""
        return {"structured_outputs": {k: getattr(self, k) for k in ("json", "regex", "choice", "grammar",
                                                                     "json_object")
                                       if getattr(self, k) is not None}}


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter to apply to a request (vLLM's shape): its name, an id unique per
    (name, weights) among what one engine is asked to serve, and the PEFT directory
    (adapter_config.json + adapter_model.safetensors). `rank` is filled in once the
    adapter's config has been read (models/lora.py), so checks need not read it again."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    rank: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise SamplingParamsError("lora_request", f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise SamplingParamsError("lora_request",
                                      f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise SamplingParamsError("lora_request", f"lora_path must be a non-empty string, got {self.lora_path!r}")

    @property
    def key(self) -> str:
        """The adapter's identity: prefix-cache hashes and the workers' weight caches are keyed by it,
        so two adapters never share KV or a slot (a name reloaded from elsewhere gets a new key)."""
        return f"{self.lora_name}#{self.lora_int_id}@{self.lora_path}"


@dataclass
class SamplingParams:
    """How to turn logits into tokens and when to stop.

    Semantics follow vLLM / OpenAI:
    - temperature 0 means greedy; top_k <= 0 (or -1) disables top-k; top_p 1
      and min_p 0 disable those filters.
    - presence/frequency penalties act on generated tokens, repetition penalty
      on prompt and generated tokens (1.0 disables it).
    - `seed` makes this request's samples reproducible whatever else is in
      the batch.
    - `logprobs=k` returns the sampled token's logprob and the k most likely
      alternatives per step (0 returns only the sampled token's).
    - `stop` strings are never included in the output text; `stop_token_ids`
      finish the request like EOS does.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (a schema, regex, ...)
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, in [-100, 100] (OpenAI's)
    lora_request: LoRARequest | None = None  # the adapter applied to this request (None: the base model)
    # Token ids that end generation besides EOS, filled in by the engine from
    # generation_config.json; not user-facing.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, msg: str):
            raise SamplingParamsError(name, msg)

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, f"must be a finite number, got {v!r}")
            return v

        def integer(name: str, allow_none: bool = False):
            v = getattr(self, name)
            if v is None and allow_none:
                return None
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, f"must be an integer, got {v!r}")
            return v

        if integer("n") < 1:
            bad("n", f"must be at least 1, got {self.n}")
        if number("temperature") < 0:
            bad("temperature", f"must be non-negative, got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if integer("top_k") < -1:
            bad("top_k", f"must be -1 (disabled) or positive, got {self.top_k}")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        integer("seed", allow_none=True)
        mt = integer("max_tokens", allow_none=True)
        if mt is not None and mt < 1:
            bad("max_tokens", f"must be at least 1, got {mt}")
        if integer("min_tokens") < 0:
            bad("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if mt is not None and self.min_tokens > mt:
            bad("min_tokens", f"must not exceed max_tokens ({mt}), got {self.min_tokens}")
        if not -2 <= number("presence_penalty") <= 2:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= number("frequency_penalty") <= 2:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if number("repetition_penalty") <= 0:
            bad("repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        lp = integer("logprobs", allow_none=True)
        if lp is not None and not 0 <= lp <= self.MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {lp}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be a boolean, got {getattr(self, name)!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                bad("stop_token_ids", f"must be non-negative integers, got {t!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > 300:
                bad("logit_bias", "must map at most 300 token ids to biases")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    bad("logit_bias", f"keys must be token ids (non-negative integers), got {t!r}")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                    bad("logit_bias", f"biases must be numbers in [-100, 100], got {b!r}")
        lr = self.lora_request
        if lr is not None and not isinstance(lr, LoRARequest):
            bad("lora_request", f"must be a LoRARequest, got {type(lr).__name__}")
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            bad("structured_outputs", f"must be a StructuredOutputsParams, got {type(so).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def clone(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def for_child(self, index: int) -> "SamplingParams":
        """The params of sample `index` of an n > 1 request: one sample each,
        and with a seed, seed + index (so the samples differ but reproduce)."""
        if self.n == 1:
            return self
        return self.clone(n=1, seed=None if self.seed is None else self.seed + index)
