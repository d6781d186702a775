"""vLLM's offline API: LLM.chat, the progress bar, prompt_token_ids dicts, Logprob objects."""

from __future__ import annotations

import pytest

from ziggurat import LLM, SamplingParams, StructuredOutputsParams
from ziggurat.outputs import Logprob

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(str(llama_dir), num_kv_blocks=512) as llm:
        yield llm


def test_chat_equals_generate_on_the_templated_prompt(llm):
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tok = llm.get_tokenizer()
    convs = [CONV, CONV[1:], CONV + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]]
    got = llm.chat(convs, p, use_tqdm=False)
    for conv, out in zip(convs, got):
        text = tok.apply_chat_template(conv)
        want = llm.generate({"prompt_token_ids": tok.encode(text, add_special_tokens=False)}, p, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
        assert out.prompt == text
    one = llm.chat(CONV, p, use_tqdm=False)
    assert len(one) == 1 and one[0].outputs[0].token_ids == got[0].outputs[0].token_ids
    custom = llm.chat(CONV, p, use_tqdm=False, chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    assert custom[0].prompt == "Be brief.|hi|"
    with pytest.raises(ValueError, match="messages"):
        llm.chat([], p)


def test_progress_bar_on_long_runs_and_silenced(llm, capsys):
    import time

    p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([[1, 2, 3]] * 800, p)  # seconds on 2 CPU cores: past the bar's 1 s delay
    took = time.perf_counter() - t
    err = capsys.readouterr().err
    if took <= 1.5:
        pytest.skip(f"the run took {took:.2f} s, under the bar's delay")
    assert "Processed prompts" in err and "800/800" in err and "tok/s" in err
    llm.generate([[1, 2, 3]] * 800, p, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err
    llm.generate([[1, 2, 3]] * 2, p)  # a short run: no bar
    assert "Processed prompts" not in capsys.readouterr().err


def test_logprob_objects_and_structured_outputs_offline(llm):
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    first = out.logprobs[0]
    sampled = first[out.token_ids[0]]
    assert isinstance(sampled, Logprob) and sampled.rank == 1 and isinstance(sampled.decoded_token, str)
    assert sampled.logprob == float(sampled) <= 0 and len(first) == 2
    assert sorted(v.rank for v in first.values()) == [1, 2]
    so = SamplingParams(max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert llm.generate("Answer:", so, use_tqdm=False)[0].outputs[0].text in ("yes", "no")


def test_logit_bias_moves_only_its_own_request(llm):
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    biased = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={11: 100.0, 12: -100.0})
    alone = llm.generate([[3, 4, 5]], plain, use_tqdm=False)[0].outputs[0].token_ids
    both = llm.generate([[3, 4, 5], [3, 4, 5]], [plain, biased], use_tqdm=False)
    assert both[0].outputs[0].token_ids == alone
    assert both[1].outputs[0].token_ids == [11] * 6
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 500})
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([[3]], SamplingParams(logit_bias={10**9: 1.0}), use_tqdm=False)
