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
console.log("all checks passed");
