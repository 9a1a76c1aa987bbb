#!/usr/bin/env python3
"""Drive a running `kojo serve` with the official `openai` Python SDK and check what a client
relies on. Usage: openai_sdk.py BASE_URL MODEL_ID. Exits non-zero on the first failed check."""
import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base, api_key="x", max_retries=0, timeout=600)
msgs = [{"role": "user", "content": "What is the capital of France?"}]


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


ids = [m.id for m in c.models.list().data]
check(ids == [model], f"models.list -> {ids}")

# chat, not streamed
r = c.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
ch = r.choices[0]
check(r.object == "chat.completion" and ch.message.role == "assistant", "chat completion shape")
check(ch.message.refusal is None and isinstance(r.system_fingerprint, str), "refusal null, fingerprint a string")
check(ch.finish_reason == "length" and r.usage.completion_tokens == 24, "length finish at max_tokens")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage adds up")
check(r.usage.prompt_tokens_details.cached_tokens is not None, "cached_tokens reported")
whole = ch.message.content

# chat, streamed, with usage
chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
text = "".join(k.choices[0].delta.content or "" for k in chunks if k.choices)
check(text == whole, f"streamed text equals the whole text ({text!r})")
check(chunks[0].choices[0].delta.role == "assistant", "first delta carries the role")
check(len({k.id for k in chunks}) == 1, "one id across chunks")
check(sum(1 for k in chunks if k.choices and k.choices[0].finish_reason) == 1, "exactly one finish_reason")
check(chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24, "final usage chunk")
check(all(k.usage is None for k in chunks[:-1]), "content chunks have usage null")
plain = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0, stream=True))
check(all(k.usage is None for k in plain), "no usage without include_usage")

# legacy completions, streamed and not
p = "The capital of France is"
w = c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0)
s = "".join(k.choices[0].text for k in c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0, stream=True))
check(w.choices[0].text == s and w.object == "text_completion", "completions: streamed equals whole")
check(c.completions.create(model=model, prompt=p, max_tokens=3, temperature=0, echo=True).choices[0].text.startswith(p), "echo")
ids_prompt = c.completions.create(model=model, prompt=[504, 3575, 282, 4649, 314], max_tokens=12, temperature=0)
check(ids_prompt.choices[0].text == w.choices[0].text, "a token-id prompt equals its text")
multi = c.completions.create(model=model, prompt=[p, "Once upon a time"], max_tokens=4, temperature=0)
check([x.index for x in multi.choices] == [0, 1], "a list of prompts gives one choice each")

# n and seeds
a = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=1.0, seed=7, n=2)
b = c.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=1.0, seed=7, n=2)
check(sorted(x.index for x in a.choices) == [0, 1], "n=2 gives indices 0 and 1")
check([x.message.content for x in a.choices] == [x.message.content for x in b.choices], "same seed, same texts")
streamed_n = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=1.0, seed=3, n=2, stream=True))
finishes = [k.choices[0].index for k in streamed_n if k.choices and k.choices[0].finish_reason]
check(sorted(finishes) == [0, 1], "streamed n=2: each choice finishes once")

# stop strings
free = c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
stop = free[6:9]
cut = c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0, stop=[stop]).choices[0]
check(cut.text == free[:free.index(stop)] and cut.finish_reason == "stop", f"stop {stop!r}")
scut = "".join(k.choices[0].text for k in c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0, stop=stop, stream=True))
check(scut == cut.text, "streamed stop")

# log-probabilities
r = c.chat.completions.create(model=model, messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
check(len(lp) == 5 and all(len(t.top_logprobs) == 3 for t in lp), "chat logprobs with 3 alternatives")
check(all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in lp), "alternatives sorted")
check(lp[0].token == lp[0].top_logprobs[0].token, "greedy picks the top alternative")
r = c.completions.create(model=model, prompt=p, max_tokens=4, temperature=0, logprobs=2)
check(len(r.choices[0].logprobs.token_logprobs) == 4 and len(r.choices[0].logprobs.top_logprobs[0]) == 2, "completion logprobs")

# bad input: clear 4xx, and the server keeps serving
for kwargs, err, param in [
    (dict(model="nope", messages=msgs), openai.NotFoundError, "model"),
    (dict(model=model, messages=msgs, temperature=5), openai.BadRequestError, "temperature"),
    (dict(model=model, messages=msgs, logprobs=True, top_logprobs=30), openai.BadRequestError, "top_logprobs"),
    (dict(model=model, messages=[]), openai.BadRequestError, "messages"),
    (dict(model=model, messages=msgs, max_tokens=100000), openai.BadRequestError, "max_tokens"),
]:
    try:
        c.chat.completions.create(**kwargs)
        check(False, f"{kwargs} accepted")
    except err as e:
        check(e.body.get("param") == param, f"{err.__name__} names {param}: {e.body.get('message')}")
check(c.chat.completions.create(model=model, messages=msgs, max_tokens=2).choices[0].message.content is not None, "still serving")
print("all checks passed")
