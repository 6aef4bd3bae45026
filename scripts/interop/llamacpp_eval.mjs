// Runs a GGUF file in llama.cpp (node-llama-cpp's prebuilt CPU binary) for the interop tests
// (docs/interop.md). Usage:
//   node llamacpp_eval.mjs NODE_MODULES_DIR REQUEST.json
// REQUEST: {"model": path, "tokens": [ids], "prompt": text, "n_predict": n, "kv_f32": bool, "threads": n,
//           "bench": {"prompt": text, "n_predict": n, "reps": n}}   (bench optional)
// Prints one JSON object: "logprobs" [positions][vocab] (log of llama.cpp's next-token probabilities after
// each of "tokens"), "prompt_tokens" (llama.cpp's own tokenisation of "prompt" with <s>), "greedy" (its
// greedy continuation, temperature 0) and, with "bench", "bench_prompt_tokens" and "decode_tokens_per_s"
// per repetition (tokens after the first, at batch 1).
import {readFileSync} from "node:fs";
import {createRequire} from "node:module";
import path from "node:path";
import {pathToFileURL} from "node:url";

const [modulesDir, requestPath] = process.argv.slice(2);
if (!modulesDir || !requestPath) {
  console.error("usage: node llamacpp_eval.mjs NODE_MODULES_DIR REQUEST.json");
  process.exit(2);
}
const req = JSON.parse(readFileSync(requestPath, "utf8"));
const require = createRequire(path.join(modulesDir, "noop.js"));
const entry = require.resolve("node-llama-cpp");
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);

// No compiling and no downloading: a missing prebuilt binary is an error.
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
                              logLevel: process.env.MOEFORGE_LLAMA_LOG === "debug" ? LlamaLogLevel.debug : LlamaLogLevel.error,
                              maxThreads: req.threads ?? 1});
const model = await llama.loadModel({modelPath: req.model});
const kv = req.kv_f32 === false ? {} : {experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"};

async function newSequence(n) {
  // node-llama-cpp keeps one cell free: a context of n + 2 holds n tokens without a context shift.
  const context = await model.createContext({contextSize: n + 2, batchSize: n + 2, flashAttention: false,
                                             threads: req.threads ?? 1, ...kv});
  return {context, sequence: context.getSequence()};
}

const out = {};
if (req.tokens?.length) {
  const {context, sequence} = await newSequence(req.tokens.length);
  const res = await sequence.controlledEvaluate(
      req.tokens.map((t) => [t, {generateNext: {probabilities: true}}]));
  const V = model.tokens.vocabSize ?? model.vocabularySize;
  out.logprobs = res.map((r) => {
    const row = new Array(V).fill(-Infinity);
    for (const [tok, p] of r.next.probabilities) row[tok] = Math.log(p);
    return row;
  });
  await context.dispose();
}
if (req.prompt !== undefined) {
  const prompt = [model.tokens.bos, ...model.tokenize(req.prompt)];
  out.prompt_tokens = prompt;
  const n = req.n_predict ?? 16;
  const {context, sequence} = await newSequence(prompt.length + n);
  out.greedy = [];
  for await (const t of sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true})) {
    out.greedy.push(t);
    if (out.greedy.length >= n || t === model.tokens.eos) break;
  }
  out.greedy_text = model.detokenize(out.greedy.filter((t) => t !== model.tokens.eos));
  await context.dispose();
}
if (req.bench) {
  // Decode speed at batch 1: the prompt is evaluated, then n_predict greedy tokens are timed.
  out.decode_tokens_per_s = [];
  const prompt = [model.tokens.bos, ...model.tokenize(req.bench.prompt)];
  out.bench_prompt_tokens = prompt.length;
  for (let r = 0; r < (req.bench.reps ?? 1); ++r) {
    const {context, sequence} = await newSequence(prompt.length + req.bench.n_predict);
    const it = sequence.evaluate(prompt, {temperature: 0, yieldEogToken: true});
    await it.next();  // prompt + first token
    const t0 = process.hrtime.bigint();
    let n = 0;
    for await (const t of it) {
      if (++n >= req.bench.n_predict - 1) break;
      void t;
    }
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    out.decode_tokens_per_s.push(n / s);
    await context.dispose();
  }
}
await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(out) + "\n");
