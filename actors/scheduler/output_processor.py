"""The one output processor: engine updates -> what a caller sees.

Shared by the offline `LLM.generate` (llm.py) and the HTTP server
(actors/ingress/server.py), so both turn a request's per-step updates into
text the same way: n samples per prompt, incremental detokenization that
never splits a multi-byte character, stop strings (text that could begin one
is held back), finish reasons and logprobs.

One request = its prompts x n samples. Sample `index` (prompt_index * n + i)
runs in the engine as request `f"{request_id}-{index}"`.

Finish reasons, combined the same way everywhere:
  * a stop string seen in the text ends the sample with "stop" (its
    stop_reason is the string); if the engine had not finished it yet, the
    caller must abort it with reason "stop" (`Delta.stop_now`);
  * otherwise the engine's reason: "stop" (EOS or a stop token id, which is
    the stop_reason), "length", "abort" or "error".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ziggurat.actors.scheduler.messages import UNKNOWN, RequestUpdate
from ziggurat.models.step import Logprobs
from ziggurat.models.tokenizer import TextStream, Tokenizer
from ziggurat.outputs import CompletionOutput, Logprob, RequestOutput
from ziggurat.sampling_params import SamplingParams


@dataclass
class Sample:
    index: int  # the choice index across the request
    prompt_index: int
    request_id: str  # the engine request that generates it
    params: SamplingParams
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    delivered: int = 0  # tokens whose text the caller has passed on (what a failure bills)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    """What one update added to one sample."""

    sample: Sample
    text: str
    logprobs: list[Logprobs]
    stop_now: bool = False  # a stop string ended it first: abort the engine request with reason "stop"

    @property
    def finished(self) -> bool:
        return self.sample.finished


class RequestOutputs:
    def __init__(self, request_id: str, prompts: list[list[int]], params: SamplingParams, tokenizer: Tokenizer):
        self.request_id, self.prompts, self.params = request_id, prompts, params
        self.tokenizer = tokenizer
        self.samples: list[Sample] = []
        for pi, ids in enumerate(prompts):
            for i in range(params.n):
                p = params.for_child(i)
                index = pi * params.n + i
                stream = TextStream(tokenizer, ids, p.stop, p.skip_special_tokens, p.include_stop_str_in_output)
                self.samples.append(Sample(index, pi, f"{request_id}-{index}", p, stream))

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def unfinished_ids(self) -> list[str]:
        return [s.request_id for s in self.samples if not s.finished]

    @property
    def failed(self) -> bool:
        """A sample ended through a failure on our side (finish reason "error")."""
        return any(s.finish_reason == "error" for s in self.samples)

    def apply(self, index: int, u: RequestUpdate) -> Delta | None:
        """Apply one engine update to sample `index`; None once that sample has finished."""
        s = self.samples[index]
        if s.finished:
            return None  # the engine's last word on a sample a stop string already ended
        s.token_ids.extend(u.new_token_ids)
        s.logprobs.extend(u.new_logprobs)
        for lp in u.new_logprobs:
            s.cumulative_logprob += lp.logprob
        if u.num_output_tokens != UNKNOWN:  # an ingress's own failure update knows no counts
            s.num_output_tokens, s.num_cached_tokens = u.num_output_tokens, u.num_cached_tokens
        delta = s.stream.add(u.new_token_ids, final=u.finish_reason is not None)
        s.text += delta
        stop_now = False
        if s.stream.stopped:
            s.finish_reason, s.stop_reason = "stop", s.stream.stop_reason
            stop_now = u.finish_reason is None
        elif u.finish_reason is not None:
            s.finish_reason, s.stop_reason = u.finish_reason, u.stop_reason
        return Delta(s, delta, list(u.new_logprobs), stop_now)

    # -- totals, for usage ---------------------------------------------------------------

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def completion_tokens(self) -> int:
        return sum(s.num_output_tokens for s in self.samples)

    @property
    def cached_tokens(self) -> int:
        """Per prompt, its first sample's prefix-cache hit (the one that billed the prompt)."""
        return sum(self.samples[pi * self.params.n].num_cached_tokens for pi in range(len(self.prompts)))

    # -- the offline API's shape ---------------------------------------------------------

    def to_request_output(self, prompt_text: str | None) -> RequestOutput:
        """vLLM's RequestOutput (one prompt): logprobs as {token id: logprob} per token."""
        want_lp = self.params.logprobs is not None
        text = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **_: None)

        def entry(lp) -> dict:
            d = {a: Logprob(b, r, text([a], skip_special_tokens=False))
                 for r, (a, b) in enumerate(zip(lp.top_ids, lp.top_logprobs), start=1)}
            d[lp.token_id] = Logprob(lp.logprob, lp.rank, text([lp.token_id], skip_special_tokens=False))
            return {lp.token_id: d.pop(lp.token_id), **d}  # the sampled token first

        outs = [CompletionOutput(
            index=s.index, text=s.text, token_ids=list(s.token_ids), finish_reason=s.finish_reason,
            stop_reason=s.stop_reason, cumulative_logprob=s.cumulative_logprob if want_lp else None,
            logprobs=[entry(lp) for lp in s.logprobs] if want_lp else None) for s in self.samples]
        return RequestOutput(self.request_id, prompt_text, self.prompts[0], outs, self.cached_tokens, self.finished)
