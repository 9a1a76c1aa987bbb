// Drive a running `kojo serve` with the official `openai` npm package (v6).
// Usage: node check.mjs BASE_URL MODEL_ID
import OpenAI from "openai";

const [base, model] = process.argv.slice(2);
const c = new OpenAI({ baseURL: base, apiKey: "x", maxRetries: 0, timeout: 600_000 });
const msgs = [{ role: "user", content: "What is the capital of France?" }];
function check(cond, what) {
  if (!cond) { console.log(`FAILED: ${what}`); process.exit(1); }
  console.log(`ok: ${what}`);
}

const models = await c.models.list();
check(models.data.map((m) => m.id).join() === model, "models.list");

const whole = await c.chat.completions.create({ model, messages: msgs, max_tokens: 20, temperature: 0 });
check(whole.choices[0].finish_reason === "length" && whole.usage.completion_tokens === 20, "chat: length at max_tokens");
check(whole.choices[0].message.refusal === null, "refusal is null");

const stream = await c.chat.completions.create({ model, messages: msgs, max_tokens: 20, temperature: 0, stream: true, stream_options: { include_usage: true } });
let text = "", finishes = 0, usage = null, first = true, role = null;
for await (const k of stream) {
  if (first) { role = k.choices[0]?.delta?.role; first = false; }
  if (k.choices.length) { text += k.choices[0].delta.content ?? ""; if (k.choices[0].finish_reason) finishes++; }
  if (k.usage) usage = k.usage;
}
check(text === whole.choices[0].message.content, "streamed text equals the whole text");
check(role === "assistant" && finishes === 1 && usage?.completion_tokens === 20, "role first, one finish, final usage");

const cw = await c.completions.create({ model, prompt: "The capital of France is", max_tokens: 10, temperature: 0 });
let cs = "";
for await (const k of await c.completions.create({ model, prompt: "The capital of France is", max_tokens: 10, temperature: 0, stream: true })) cs += k.choices[0]?.text ?? "";
check(cw.choices[0].text === cs, "completions: streamed equals whole");

const n2 = await c.chat.completions.create({ model, messages: msgs, max_tokens: 8, temperature: 1, seed: 11, n: 2 });
const again = await c.chat.completions.create({ model, messages: msgs, max_tokens: 8, temperature: 1, seed: 11, n: 2 });
check(n2.choices.length === 2 && n2.choices.map((x) => x.message.content).join("|") === again.choices.map((x) => x.message.content).join("|"), "n=2, seeded");

const free = cw.choices[0].text;
const stop = free.slice(6, 9);
const cut = await c.completions.create({ model, prompt: "The capital of France is", max_tokens: 10, temperature: 0, stop: [stop] });
check(cut.choices[0].text === free.slice(0, free.indexOf(stop)) && cut.choices[0].finish_reason === "stop", "stop string");

const lp = await c.chat.completions.create({ model, messages: msgs, max_tokens: 3, temperature: 0, logprobs: true, top_logprobs: 2 });
check(lp.choices[0].logprobs.content.length === 3 && lp.choices[0].logprobs.content[0].top_logprobs.length === 2, "logprobs");

try {
  await c.chat.completions.create({ model, messages: msgs, temperature: 9 });
  check(false, "temperature 9 accepted");
} catch (e) {
  check(e.status === 400 && e.error?.param === "temperature", "400 names the parameter");
}
// structured outputs and tool calls
const schema = { type: "object", properties: { city: { type: "string", maxLength: 20 }, rank: { type: "integer", minimum: 1, maximum: 9 } },
                 required: ["city", "rank"], additionalProperties: false };
const js = await c.chat.completions.create({ model, messages: msgs, max_tokens: 100, temperature: 1, seed: 4,
  response_format: { type: "json_schema", json_schema: { name: "city", schema, strict: true } } });
const parsed = JSON.parse(js.choices[0].message.content);
check(typeof parsed.city === "string" && parsed.rank >= 1 && parsed.rank <= 9, "response_format json_schema parses and fits");
const tools = [{ type: "function", function: { name: "lookup", description: "Look a city up", parameters: schema } }];
const tc = await c.chat.completions.create({ model, messages: msgs, max_tokens: 200, temperature: 0, tools, tool_choice: "required" });
const call = tc.choices[0].message.tool_calls?.[0];
check(tc.choices[0].finish_reason === "tool_calls" && call?.function.name === "lookup" && typeof JSON.parse(call.function.arguments).city === "string",
      "tool_choice required: a lookup call");
const acc = {};
for await (const k of await c.chat.completions.create({ model, messages: msgs, max_tokens: 200, temperature: 0, tools, tool_choice: "required", stream: true })) {
  for (const d of k.choices[0]?.delta?.tool_calls ?? []) {
    acc[d.index] ??= { name: d.function?.name, arguments: "" };
    acc[d.index].arguments += d.function?.arguments ?? "";
  }
}
const want = tc.choices[0].message.tool_calls.map((t) => t.function.name + t.function.arguments).join("|");
check(Object.values(acc).map((t) => t.name + t.arguments).join("|") === want, "streamed tool calls equal the whole ones");
console.log("all checks passed");
