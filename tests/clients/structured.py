#!/usr/bin/env python3
"""Structured outputs and tool calls against a running `kojo serve`, as users' clients send them:
the openai SDK (raw and `.parse()` with Pydantic), LangChain, litellm, checked with the
`jsonschema` package. Usage: structured.py BASE_URL MODEL_ID [PART...]; parts: schema, formats,
sdk_parse, tools, langchain, litellm (default: all). Exits non-zero on the first failed check."""
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
from openai import OpenAI
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
parts = set(sys.argv[3:]) or {"schema", "formats", "sdk_parse", "tools", "langchain", "litellm"}
c = OpenAI(base_url=base, api_key="x", max_retries=0, timeout=600)


def check(cond, what, quiet=False):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    if not quiet:
        print(f"ok: {what}", flush=True)


# nested: an enum, integer bounds, required and optional fields, an array of objects, a $ref
PET = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 25},
        "name": {"type": "string", "minLength": 1, "maxLength": 12, "pattern": "^[A-Za-z]+$"},
        "owner": {"$ref": "#/$defs/person"},
        "toys": {"type": "array", "items": {"$ref": "#/$defs/toy"}, "maxItems": 2},
        "vaccinated": {"type": "boolean"},
    },
    "required": ["kind", "age", "name", "owner"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"first": {"type": "string", "maxLength": 10},
                           "phone": {"anyOf": [{"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}, {"type": "null"}]}},
            "required": ["first", "phone"],
            "additionalProperties": False,
        },
        "toy": {
            "type": "object",
            "properties": {"label": {"type": "string", "maxLength": 8}, "price": {"type": "number", "minimum": 0, "maximum": 100}},
            "required": ["label"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


def streamed_text(**kw):
    chunks = list(c.chat.completions.create(stream=True, **kw))
    return "".join(k.choices[0].delta.content or "" for k in chunks if k.choices), chunks


if "schema" in parts:
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}

    def one(seed):
        kw = dict(model=model, messages=ASK, temperature=1.0, seed=seed, max_tokens=300, response_format=rf)
        if seed % 2:
            text, _ = streamed_text(**kw)
            return seed, text, None
        r = c.chat.completions.create(**kw)
        return seed, r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(50)))
    for seed, text, finish in results:
        try:
            v = json.loads(text)
            jsonschema.validate(v, PET)
        except Exception as e:  # noqa: BLE001
            raise SystemExit(f"FAILED: seed {seed}: {e}: {text!r}")
        if finish is not None:
            check(finish == "stop", f"seed {seed}: finish stop")
    check(True, "50 sampled outputs (temperature 1, 8 at once, half streamed) validate against the nested schema")
    # n > 1: every choice validates
    r = c.chat.completions.create(model=model, messages=ASK, temperature=1.0, seed=7, n=4, max_tokens=300, response_format=rf)
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), PET)
    check(len(r.choices) == 4, "n=4: every choice validates")

if "formats" in parts:
    for seed in range(10):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give me a JSON object about Tokyo."}],
                                      temperature=1.0, seed=seed, max_tokens=200, response_format={"type": "json_object"})
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            check(isinstance(json.loads(text), dict), f"json_object seed {seed} parses as an object")
        else:
            check(text.startswith("{"), f"json_object seed {seed} ran out of tokens inside an object")
    import re
    for seed in range(10):
        r = c.completions.create(model=model, prompt="A phone number:", temperature=1.0, seed=seed, max_tokens=30,
                                 extra_body={"guided_regex": r"[0-9]{3}-[0-9]{4}"})
        check(re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].text), f"guided_regex on completions, seed {seed}: {r.choices[0].text!r}")
    choices = ["positive", "negative", "neutral"]
    for seed in range(10):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Sentiment of 'I love it'?"}],
                                      temperature=1.0, seed=seed, max_tokens=10,
                                      extra_body={"structured_outputs": {"choice": choices}})
        check(r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop",
              f"structured_outputs.choice seed {seed}: {r.choices[0].message.content!r}")
    r = c.completions.create(model=model, prompt="Answer:", temperature=1.0, seed=3, max_tokens=20,
                             extra_body={"guided_grammar": 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,3}/'})
    check(re.fullmatch(r"yes|no|maybe [0-9]{1,3}", r.choices[0].text), f"guided_grammar (Lark): {r.choices[0].text!r}")
    r = c.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=300,
                                  extra_body={"guided_json": PET})
    jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    check(True, "guided_json validates")

if "sdk_parse" in parts:
    class Owner(BaseModel):
        first: str = Field(max_length=10)

    class Pet(BaseModel):
        kind: str = Field(pattern="^(cat|dog)$")
        age: int = Field(ge=0, le=20)
        owner: Owner

    r = c.chat.completions.parse(model=model, messages=ASK, temperature=0, max_tokens=200, response_format=Pet)
    p = r.choices[0].message.parsed
    check(isinstance(p, Pet) and 0 <= p.age <= 20 and p.kind in ("cat", "dog"), f"chat.completions.parse(Pydantic) -> {p!r}")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Local time in a time zone",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                "required": ["zone"], "additionalProperties": False}},
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
Q = [{"role": "user", "content": "What is the weather and the time in Tokyo?"}]


def check_calls(msg, what, most=None):
    calls = msg.tool_calls or []
    check(len(calls) >= 1 and (most is None or len(calls) <= most), f"{what}: {len(calls)} call(s)")
    for tc in calls:
        check(tc.type == "function" and tc.id and tc.function.name in SCHEMAS, f"{what}: name {tc.function.name} is from tools")
        jsonschema.validate(json.loads(tc.function.arguments), SCHEMAS[tc.function.name])
    return calls


def from_stream(chunks, n):
    """The calls and content of each choice, as concatenated deltas (checking index/id rules)."""
    out = [{"content": "", "calls": {}, "finish": None} for _ in range(n)]
    for k in chunks:
        for ch in k.choices:
            o = out[ch.index]
            o["content"] += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                if d.index not in o["calls"]:
                    check(d.id and d.type == "function" and d.function.name, "first delta of a call: index, id, type, name", True)
                    o["calls"][d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    check(d.id is None and d.function.name is None, "later deltas carry arguments only", True)
                    o["calls"][d.index]["arguments"] += d.function.arguments or ""
            if ch.finish_reason:
                o["finish"] = ch.finish_reason
    return out


if "tools" in parts:
    for choice in ["required", {"type": "function", "function": {"name": "get_time"}}]:
        r = c.chat.completions.create(model=model, messages=Q, tools=[WEATHER, TIME], tool_choice=choice, temperature=0, max_tokens=400)
        ch = r.choices[0]
        check(ch.finish_reason == "tool_calls", f"tool_choice {choice}: finish_reason tool_calls")
        calls = check_calls(ch.message, f"tool_choice {choice}")
        if isinstance(choice, dict):
            check(len(calls) == 1 and calls[0].function.name == "get_time", "named choice: exactly one call of it")
    for par in [False, None]:
        extra = {} if par is None else {"parallel_tool_calls": par}
        r = c.chat.completions.create(model=model, messages=Q, tools=[WEATHER, TIME], tool_choice="required",
                                      temperature=1.0, seed=5, max_tokens=400, **extra)
        check_calls(r.choices[0].message, f"parallel_tool_calls {par}", most=1)
    # stream == whole for the same seed, n=2, sampled, parallel calls allowed
    kw = dict(model=model, messages=Q, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=True,
              temperature=1.0, seed=11, n=2, max_tokens=400)
    whole = c.chat.completions.create(**kw)
    streamed = from_stream(list(c.chat.completions.create(stream=True, **kw)), 2)
    for i, ch in enumerate(whole.choices):
        s = streamed[ch.index]
        # (ids are per request: two requests never share them)
        want = [(t.function.name, t.function.arguments) for t in ch.message.tool_calls or []]
        got = [(v["name"], v["arguments"]) for _, v in sorted(s["calls"].items())]
        check(want == got and s["finish"] == ch.finish_reason, f"choice {i}: streamed calls == whole calls ({len(want)} calls)")
        check(sorted(s["calls"]) == list(range(len(got))), f"choice {i}: call indexes 0..{len(got)}")
    # auto: text or calls; whatever comes back is well formed
    r = c.chat.completions.create(model=model, messages=Q, tools=[WEATHER, TIME], temperature=0, max_tokens=100)
    ch = r.choices[0]
    if ch.message.tool_calls:
        check_calls(ch.message, "auto")
    check(ch.finish_reason in ("tool_calls", "stop", "length"), f"auto: finish {ch.finish_reason}")
    # tool-call history through the generic format (SmolLM2's template has no tools)
    hist = Q + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Tokyo", "unit": "C"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    r = c.chat.completions.create(model=model, messages=hist, tools=[WEATHER, TIME], tool_choice="none", temperature=0, max_tokens=40)
    ch = r.choices[0]
    check(ch.message.tool_calls is None and isinstance(ch.message.content, str) and ch.finish_reason in ("stop", "length"),
          "tool history + tool_choice none: a text answer, no calls parsed")
    r = c.chat.completions.create(model=model, messages=hist, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=400)
    check_calls(r.choices[0].message, "tool history + required")
    for bad, what in [({"type": "function", "function": {"name": "nope"}}, "unknown tool"), ("sometimes", "bad tool_choice")]:
        try:
            c.chat.completions.create(model=model, messages=Q, tools=[WEATHER], tool_choice=bad, max_tokens=5)
            check(False, f"{what}: 400")
        except openai.BadRequestError as e:
            check(e.body.get("param") == "tool_choice", f"{what}: 400 naming tool_choice")

if "langchain" in parts:
    from langchain_openai import ChatOpenAI

    class City(BaseModel):
        """A city and its country."""
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        population_millions: int = Field(ge=0, le=50)

    llm = ChatOpenAI(model=model, base_url=base, api_key="x", temperature=0, max_tokens=200, max_retries=0)
    for method in ["json_schema", "function_calling"]:
        out = llm.with_structured_output(City, method=method).invoke("Tell me about Tokyo.")
        check(isinstance(out, City), f"LangChain with_structured_output(method={method}) -> {out!r}")

    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city; unit is C or F."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="required").invoke("Weather in Paris?")
    check(len(msg.tool_calls) >= 1 and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"],
          f"LangChain bind_tools -> {msg.tool_calls}")

if "litellm" in parts:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    kw = dict(model=f"openai/{model}", api_base=base, api_key="x", temperature=0, max_tokens=200)
    r = litellm.completion(messages=[{"role": "user", "content": "A JSON object about Paris."}],
                           response_format={"type": "json_object"}, **kw)
    if r.choices[0].finish_reason == "stop":
        check(isinstance(json.loads(r.choices[0].message.content), dict), "litellm JSON mode parses as an object")
    r = litellm.completion(messages=Q, tools=[WEATHER], tool_choice="required", **kw)
    tc = r.choices[0].message.tool_calls
    check(tc and tc[0].function.name == "get_weather" and json.loads(tc[0].function.arguments)["city"],
          f"litellm tools -> {tc[0].function if tc else None}")

print("all checks passed")
