"""StepCostModel: how long a step takes, fitted online from the engine's own steps.

A step's device time is close to linear in what it runs:

    seconds ~ a + b * prompt_tokens + c * decode_rows + e * decode_context

a: the weights' read and the launches (every step pays it); b: a prompt token's
matmuls (compute-bound in a large chunk); c: a decode row's own work (sampling,
its matmul rows); e: a token of context that a decode row's attention reads (KV
bytes). On an 8B model in bf16 on one H200: a ~4.7 ms, b ~27 us, c ~9 us, e ~32 ns
(scripts/sim_schedule.py's StepTimeModel, from BENCHMARKS.md's figures).

The scheduler's decode_first policy with a target step time (target_step_ms)
asks `prompt_tokens_within`: the most prompt tokens a step can take beside its
decodes and stay within the target, so a long prompt never stretches the step
that every decoding request waits on (inter-token latency), while a step with
few decodes takes a larger share (admission is not throttled when there is no
latency to protect).

The fit is exponentially weighted least squares (forgetting factor `decay` per
step, so it follows a workload whose contexts grow), over features scaled to
similar magnitudes, with a small ridge term. Until it has seen enough prompt
tokens to tell b apart, and whenever the fit is not physical (b <= 0), it
answers None and the caller uses its fixed share (max_prefill_tokens).
"""

from __future__ import annotations

import numpy as np

# Feature scales: prompt tokens / 1,000, decode rows / 100, decode context / 100,000.
_SCALE = np.array([1.0, 1e-3, 1e-2, 1e-5])


class StepCostModel:
    def __init__(self, decay: float = 0.98, ridge: float = 1e-6, min_prompt_weight: float = 2.0):
        """min_prompt_weight: the decayed sum of prompt tokens / 1,000 the fit must have seen
        before it sizes prompt shares (2.0: about two steps of 1,000 prompt tokens lately)."""
        self.decay, self.ridge, self.min_prompt_weight = decay, ridge, min_prompt_weight
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        self._prompt_weight = 0.0
        self._coef: np.ndarray | None = None  # [a, b, c, e] in seconds per unit (unscaled)
        self.observations = 0

    def observe(self, prompt_tokens: int, decode_rows: int, decode_context: int, seconds: float) -> None:
        """One step's shape and its measured device time."""
        if not (seconds > 0 and np.isfinite(seconds)):
            return
        x = np.array([1.0, prompt_tokens, decode_rows, decode_context]) * _SCALE
        d = self.decay
        self._xtx = d * self._xtx + np.outer(x, x)
        self._xty = d * self._xty + x * seconds
        self._prompt_weight = d * self._prompt_weight + x[1]
        self._coef = None
        self.observations += 1

    def coefficients(self) -> np.ndarray | None:
        """[a, b, c, e] (seconds, seconds per prompt token, per decode row, per context token), or None
        before the fit can tell the prompt term apart."""
        if self._prompt_weight < self.min_prompt_weight or self.observations < 4:
            return None
        if self._coef is None:
            try:
                w = np.linalg.solve(self._xtx + self.ridge * np.eye(4), self._xty)
            except np.linalg.LinAlgError:
                return None
            self._coef = w * _SCALE
        return self._coef

    def predict(self, prompt_tokens: int, decode_rows: int, decode_context: int) -> float | None:
        w = self.coefficients()
        if w is None:
            return None
        return float(w @ np.array([1.0, prompt_tokens, decode_rows, decode_context]))

    def prompt_tokens_within(self, target_s: float, decode_rows: int, decode_context: int) -> int | None:
        """The most prompt tokens a step with these decodes can take and stay within target_s
        (0 when the decodes alone fill it), or None while the fit is not ready or not physical."""
        w = self.coefficients()
        if w is None or w[1] <= 0:
            return None
        rest = target_s - (w[0] + w[2] * decode_rows + w[3] * decode_context)
        return max(0, int(rest / w[1]))
