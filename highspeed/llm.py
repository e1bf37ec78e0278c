"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence as Seq

from tqdm import tqdm

from highspeed.config import EngineConfig
from highspeed.engine.engine import LLMEngine
from highspeed.outputs import RequestOutput
from highspeed.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Loads a HuggingFace checkpoint folder (or the built-in demo model when ``model`` is None) and generates.

    ``engine_options`` are EngineConfig fields: block_size, num_kv_blocks, max_num_seqs, max_num_batched_tokens,
    enable_prefix_caching, max_model_len, ...
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto", **engine_options: Any):
        self.config = EngineConfig.from_options(model=model, dtype=dtype, device=device, **engine_options)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order given. A single prompt may be passed bare."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = []
        for p, sp in zip(prompts, params_list):
            rid = f"gen-{next(self._ids)}"
            self.engine.add_request(rid, p, _copy(sp))
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[r] for r in ids]

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each step; ``outputs[i].delta_text`` holds what that step added."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, _copy(params or SamplingParams()))
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> RequestOutput:
        from highspeed.tokenizer import apply_chat_template

        ids = apply_chat_template(self.tokenizer, messages)
        return self.generate([ids], params)[0]


def _copy(p: SamplingParams) -> SamplingParams:
    """Each request gets its own params object (the engine fills in max_tokens when it is None)."""
    import copy

    return copy.copy(p)
