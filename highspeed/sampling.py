"""SamplingParams: what a caller may ask of one request's decoding, validated up front."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Decoding options, named as vLLM and the OpenAI API name them.

    temperature 0 means greedy. ``seed`` makes sampling reproducible per request whatever the batch around it;
    ``logprobs`` = k returns the sampled token's log-probability and the k most likely tokens at each step.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0               # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    _stop: list[str] = field(default_factory=list, init=False, repr=False)

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self._stop = [self.stop]
        else:
            self._stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def deterministic(self) -> bool:
        """Whether two requests with these params and the same prompt must produce the same output."""
        return self.greedy or self.seed is not None

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        need(self.n <= 128, f"n must be <= 128, got {self.n}")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        need(isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0,
             f"temperature must be in [0, 100], got {self.temperature!r}")
        need(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
             f"top_p must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        need(isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64),
             f"seed must be an integer, got {self.seed!r}")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= self.MAX_LOGPROBS),
             f"logprobs must be an integer in [0, {self.MAX_LOGPROBS}], got {self.logprobs!r}")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        need(all(isinstance(s, str) and s for s in self._stop), "stop strings must be non-empty strings")
        need(len(self._stop) <= 16, "at most 16 stop strings")
        need(all(t >= 0 for t in self.stop_token_ids or []), "stop_token_ids must be non-negative")

    def merge_key(self) -> tuple:
        """Everything that shapes the output: equal keys + equal prompts -> identical outputs when deterministic."""
        return (self.n, self.max_tokens, float(self.temperature), float(self.top_p), self.top_k, float(self.min_p),
                self.seed, tuple(self._stop), tuple(self.stop_token_ids or ()), self.ignore_eos, self.logprobs,
                self.min_tokens, self.skip_special_tokens, self.include_stop_str_in_output)
