// The official OpenAI client (the `openai` npm package, installed by scripts/install-openai-client.sh)
// against `moeforge serve` (docs/serve.md; tests/test_serve.cpp runs it):
//   node scripts/serve-openai-client.cjs NODE_MODULES BASE_URL PROMPT MAX_TOKENS
// Lists the models, asks for a greedy completion, a greedy streamed chat completion (with usage) and a
// request the server must refuse, and prints what came back as one JSON object. Exit 1 on anything else.
'use strict';
const path = require('path');

const [modules, baseURL, prompt, maxTokensText] = process.argv.slice(2);
if (!modules || !baseURL || prompt === undefined || !maxTokensText) {
  console.error('usage: serve-openai-client.cjs NODE_MODULES BASE_URL PROMPT MAX_TOKENS');
  process.exit(2);
}
const openai = require(path.join(modules, 'openai'));
const OpenAI = openai.OpenAI || openai.default || openai;
const maxTokens = Number(maxTokensText);

async function main() {
  const client = new OpenAI({ baseURL, apiKey: 'not-needed', maxRetries: 0, timeout: 120000 });
  const out = { client_version: openai.VERSION || null };
  const models = await client.models.list();
  out.models = models.data.map((m) => m.id);
  const model = out.models[0];

  const c = await client.completions.create({ model, prompt, max_tokens: maxTokens, temperature: 0 });
  out.completion = c.choices[0].text;
  out.completion_finish = c.choices[0].finish_reason;
  out.completion_usage = c.usage;

  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: prompt }],
    max_tokens: maxTokens,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let chunks = 0;
  let finish = null;
  let usage = null;
  let role = null;
  for await (const chunk of stream) {
    chunks += 1;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      if (choice.delta && choice.delta.role) role = choice.delta.role;
      if (choice.delta && choice.delta.content) text += choice.delta.content;
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  out.chat_stream = text;
  out.chat_stream_chunks = chunks;
  out.chat_stream_finish = finish;
  out.chat_stream_role = role;
  out.chat_stream_usage = usage;

  try {
    await client.completions.create({ model, prompt, max_tokens: 1e12, temperature: 0 });
    out.refused_status = 0;
  } catch (e) {
    if (!(e instanceof OpenAI.APIError)) throw e;
    out.refused_status = e.status;
    out.refused_param = e.param === undefined ? null : e.param;
    out.refused_message = e.message;
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => {
  console.error(String((e && e.stack) || e));
  process.exit(1);
});
