// The official OpenAI Node SDK, unchanged, against qbt serve: one whole and one streamed chat completion, and
// one legacy completion. Prints one JSON line per result for tests/e2e/test_chat.py to check.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.QBT_BASE_URL, apiKey: process.env.QBT_API_KEY, maxRetries: 0 });
const model = process.env.QBT_MODEL;
const messages = [{ role: "user", content: "What is the capital of Canada?" }];

const whole = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0 });
console.log(JSON.stringify({ kind: "whole", text: whole.choices[0].message.content, usage: whole.usage }));

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
console.log(JSON.stringify({ kind: "stream", text, usage }));

const legacy = await client.completions.create({ model, prompt: "The capital of Canada is", max_tokens: 4, temperature: 0 });
console.log(JSON.stringify({ kind: "legacy", text: legacy.choices[0].text, usage: legacy.usage }));
