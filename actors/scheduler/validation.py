"""The one rule set for what a request may ask of a replica.

Every entry point calls `check_request`: the offline `LLM`, the HTTP ingress
(before it spends a quota reservation), the scheduler actor's `submit` (it
trusts no caller) and `EngineCore.add_request`. SamplingParams validates its
own fields' types and ranges when it is built (sampling_params.py); this
module adds what depends on the model and the engine: the vocabulary, the
context length, and bounds that keep every number inside what the engine's
int32/int64 tables can hold.

Rules:
  * a prompt is a non-empty list of ints in [0, vocab_size);
  * it leaves room for at least one generated token: len < max_model_len;
  * max_tokens is an upper bound, not a promise: generation also ends, with
    finish reason "length", when the context is full (as vLLM does; the
    scheduler clamps max_tokens to the room left, so no count overflows);
  * stop_token_ids lie in the vocabulary; min_tokens fits the context;
  * n <= MAX_N; a seed (and seed + n, the last sample's) fits an int64;
  * a LoRA adapter only where LoRA is enabled, readable, of rank <= max_lora_rank
    (its error names `model`: adapters are addressed as models over HTTP).

Errors name the request field at fault (`param`: "prompt" for completions
and offline prompts, "messages" for chat) and carry a code the HTTP layer
maps to a status ("invalid" and "context_length_exceeded" are 400s).
"""

from __future__ import annotations

from dataclasses import dataclass

from ziggurat.sampling_params import SamplingParams

MAX_N = 128  # samples per request: n is a fan-out of whole requests, so it is bounded like a batch
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class ModelLimits:
    """What a replica can hold, known once its KV cache is sized."""

    max_model_len: int
    vocab_size: int
    max_lora_rank: int = 0  # 0: the replica serves no LoRA adapters


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def check_prompt(token_ids, limits: ModelLimits, param: str = "prompt") -> None:
    n = len(token_ids)
    if n == 0:
        raise RequestError(f"{param}: must contain at least one token", param)
    # The common case in C loops (a scheduler checks every submission); the slow scan names the culprit.
    if not (set(map(type, token_ids)) <= {int} and min(token_ids) >= 0 and max(token_ids) < limits.vocab_size):
        bad = next((t for t in token_ids if type(t) is not int or not 0 <= t < limits.vocab_size), None)
        raise RequestError(f"{param}: token id {bad!r} is outside the vocabulary [0, {limits.vocab_size})", param)
    if n >= limits.max_model_len:
        raise RequestError(f"{param}: {n} tokens leave no room to generate within "
                           f"max_model_len={limits.max_model_len}", param, "context_length_exceeded")


def check_params(params: SamplingParams, limits: ModelLimits) -> None:
    if params.n > MAX_N:
        raise RequestError(f"n: at most {MAX_N} samples per request, got {params.n}", "n")
    if params.seed is not None and not -_INT64_MAX - 1 <= params.seed <= _INT64_MAX - params.n:
        raise RequestError(f"seed: must fit a signed 64-bit integer, got {params.seed}", "seed")
    for t in params.stop_token_ids:
        if t >= limits.vocab_size:
            raise RequestError(f"stop_token_ids: token id {t} is outside the vocabulary [0, {limits.vocab_size})",
                               "stop_token_ids")
    for t in params.logit_bias or ():
        if t >= limits.vocab_size:
            raise RequestError(f"logit_bias: token id {t} is outside the vocabulary [0, {limits.vocab_size})",
                               "logit_bias")
    if params.lora_request is not None:
        check_lora(params.lora_request, limits)
    if params.min_tokens >= limits.max_model_len:
        raise RequestError(f"min_tokens: {params.min_tokens} does not fit max_model_len={limits.max_model_len}",
                           "min_tokens")


def check_lora(lora, limits: ModelLimits) -> None:
    if not limits.max_lora_rank:
        raise RequestError(f"model: adapter {lora.lora_name!r} requested, but this replica serves no LoRA adapters "
                           "(start it with enable_lora)", "model")
    rank = lora.rank
    if rank is None:
        from ziggurat.models.lora import LoRAError, read_adapter_config_cached

        try:
            rank = read_adapter_config_cached(lora.lora_path).rank
        except LoRAError as e:
            raise RequestError(f"model: adapter {lora.lora_name!r}: {e}", "model") from None
    if rank > limits.max_lora_rank:
        raise RequestError(f"model: adapter {lora.lora_name!r} has rank {rank}, above max_lora_rank="
                           f"{limits.max_lora_rank}", "model")


def check_request(token_ids, params: SamplingParams, limits: ModelLimits, param: str = "prompt") -> None:
    """Raise RequestError if this prompt with these parameters cannot be served."""
    check_prompt(token_ids, limits, param)
    check_params(params, limits)

