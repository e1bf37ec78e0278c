"""End to end on real architectures: highspeed's greedy tokens equal transformers' generate, alone, batched,
chunked and with prefix reuse; plus the offline API's shape."""
import pytest
import torch

from highspeed import LLM, SamplingParams
from tests.checkpoints import ALL_ARCHS, make_tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 9, 100, 3, 77, 18, 250, 11, 64, 2, 90, 31],   # longer than the DSA index_topk (8)
    [7, 8, 9],
    [120, 4, 33, 201, 6, 66, 13, 150, 29, 44, 1, 300, 87, 8, 19, 240, 55, 10, 71, 3, 16, 99],
]
NEW = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {a: make_tiny_checkpoint(a, tmp_path_factory.mktemp(a)) for a in ALL_ARCHS}


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_matches_transformers_alone_batched_chunked(arch, checkpoints):
    path = checkpoints[arch]
    want = [hf_greedy(path, p, NEW) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, load_progress=False)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in PROMPTS]
    assert alone == want
    # Mixed lengths in one batch; then again, now served from the prefix cache.
    for _ in range(2):
        outs = llm.generate(PROMPTS, greedy)
        assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.stats()["prefix_cache_hits"] > 0
    # Chunked prefill: prompts split over several steps beside running decodes.
    chunked = LLM(path, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=5,
                  enable_prefix_caching=False, load_progress=False)
    assert [o.outputs[0].token_ids for o in chunked.generate(PROMPTS, greedy)] == want


def test_offline_api_shape(checkpoints):
    llm = LLM(checkpoints["qwen3_moe"], dtype="float32", device="cpu", load_progress=False)
    out = llm.generate("hello world", SamplingParams(max_tokens=5, temperature=0.7, seed=1, n=2, logprobs=3,
                                                     ignore_eos=True))[0]
    assert out.prompt == "hello world" and out.prompt_token_ids
    assert len(out.outputs) == 2
    for c in out.outputs:
        assert len(c.token_ids) == 5 and c.finish_reason == "length"
        assert isinstance(c.text, str)
        assert len(c.logprobs) == 5 and all(len(d) >= 3 for d in c.logprobs)
        assert all(tok in d for tok, d in zip(c.token_ids, c.logprobs))
        assert all(lp.logprob <= 0 for d in c.logprobs for lp in d.values())
    assert out.usage.prompt_tokens == len(out.prompt_token_ids) and out.usage.completion_tokens == 10
    # Same seed, same output; streaming deltas add up to the final text.
    again = llm.generate("hello world", SamplingParams(max_tokens=5, temperature=0.7, seed=1, n=2, ignore_eos=True))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    parts, final = [], None
    for o in llm.generate_stream("hello world", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
        parts.append(o.outputs[0].delta_text)
        final = o
    assert final.finished and "".join(parts) == final.outputs[0].text
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        llm.generate([[]], SamplingParams())
