"""Completions and chat over HTTP with the official openai client: greedy identity with the offline `LLM`,
streaming, n, seeds, stop strings, logprobs, usage and the prefix cache."""

from __future__ import annotations

import math

import pytest

from pdserve import SamplingParams

pytestmark = pytest.mark.e2e

PROMPTS = ["Hello, my name is", "The capital of France is"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def _ids(resp) -> list[list[int]]:
    return [c.model_extra["token_ids"] for c in sorted(resp.choices, key=lambda c: c.index)]


def test_completion_greedy_matches_offline(client, model_name, llm):
    token_prompt = llm.engine.info.encode_prompt("token ids in, token ids out")
    for prompt in PROMPTS + [token_prompt]:
        resp = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        ref = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0]
        choice = resp.choices[0]
        assert choice.text == ref.text
        assert choice.model_extra["token_ids"] == ref.token_ids
        assert choice.model_extra["prompt_token_ids"] == ref.prompt_token_ids
        assert choice.finish_reason == ref.finish_reason == "length"
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert resp.usage.completion_tokens == 12
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_chat_greedy_matches_offline_streamed_and_whole(client, model_name, llm):
    ref = llm.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0))[0]
    resp = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"return_token_ids": True}
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].model_extra["token_ids"] == ref.token_ids
    assert resp.usage.prompt_tokens == ref.num_prompt_tokens

    chunks = list(
        client.chat.completions.create(
            model=model_name, messages=MESSAGES, max_completion_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_completion_stream_with_usage(client, model_name, llm):
    ref = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))[0]
    chunks = list(
        client.completions.create(
            model=model_name,
            prompt=PROMPTS[0],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == ref.num_prompt_tokens
    assert "".join(c.choices[0].text for c in content) == ref.text
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])


def test_batch_prompts_and_n_are_indexed_like_openai(client, model_name, llm):
    resp = client.completions.create(model=model_name, prompt=PROMPTS, n=2, max_tokens=6, temperature=0)
    refs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0))
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in resp.choices}
    assert texts[0] == texts[1] == refs[0].text  # choice index = prompt_index * n + sample_index
    assert texts[2] == texts[3] == refs[1].text
    assert resp.usage.prompt_tokens == sum(r.num_prompt_tokens for r in refs)  # once per prompt, not per n
    assert resp.usage.completion_tokens == 4 * 6


def test_seed_is_deterministic_and_choice_i_uses_seed_plus_i(client, model_name):
    def sample(seed, n=1):
        resp = client.completions.create(
            model=model_name, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, seed=seed, n=n
        )
        return [c.text for c in sorted(resp.choices, key=lambda c: c.index)]

    first = sample(7)
    assert sample(7) == first
    pair = sample(7, n=2)
    assert pair[0] == first[0]
    assert pair[1] == sample(8)[0]
    assert pair[0] != pair[1]


def test_chat_n2_streaming(client, model_name):
    chunks = list(
        client.chat.completions.create(
            model=model_name, messages=MESSAGES, n=2, max_tokens=5, temperature=0.8, seed=3, stream=True
        )
    )
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert all(texts.values())


def test_stop_strings(client, model_name, llm):
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))[0].text
    stop = full[10:12]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        resp = client.completions.create(
            model=model_name, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop, stream=stream
        )
        chunks = list(resp) if stream else [resp]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
    ref = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, stop=[stop, "\x00"]))[0]
    resp = client.completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "\x00"]
    )
    assert resp.choices[0].text == ref.text == expected


def test_completion_logprobs_match_offline(client, model_name, llm):
    ref = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    resp = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for got, want, tops, token in zip(lp.token_logprobs, ref.logprobs, lp.top_logprobs, lp.tokens):
        assert math.isclose(got, want.logprob, abs_tol=1e-4)
        assert 3 <= len(tops) <= 4 and tops[token] == got  # the sampled token is always listed
        assert max(tops.values()) == got  # greedy: the sampled token is the most likely

    streamed = list(
        client.completions.create(
            model=model_name, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1, stream=True
        )
    )
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_chat_logprobs(client, model_name):
    resp = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_repeated_long_prompt_reports_cached_tokens(client, model_name):
    prompt = "A long shared system prompt that fills several KV blocks. " * 6
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 300
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached >= second.usage.prompt_tokens - 16
    assert first.choices[0].text == second.choices[0].text


def test_echo_prepends_the_prompt(client, model_name):
    plain = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    echoed = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text
    chunks = list(
        client.completions.create(
            model=model_name, prompt=PROMPTS[0], max_tokens=5, temperature=0, echo=True, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
