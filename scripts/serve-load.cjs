// Load on `moeforge serve` (docs/serve.md, "Load"): N concurrent clients for D seconds, each sending one
// completion request after the other over keep-alive HTTP (Node's fetch); then requests/s, generated
// tokens/s, latency p50/p99, errors, and the server's resident memory (VmRSS from /proc) sampled every
// second, as one JSON object on stdout. Loopback only; stops by itself: no request starts after D seconds,
// and each one that runs past REQUEST_TIMEOUT_S (180) is aborted and counted as an error.
//   node scripts/serve-load.cjs BASE_URL SERVER_PID [CLIENTS=8] [SECONDS=60] [MAX_TOKENS=32] [STREAM=0]
'use strict';
const fs = require('fs');

const [base, pidText, clientsText = '8', secondsText = '60', maxTokensText = '32', streamText = '0'] =
  process.argv.slice(2);
if (!base || !pidText) {
  console.error('usage: serve-load.cjs BASE_URL SERVER_PID [CLIENTS] [SECONDS] [MAX_TOKENS] [STREAM]');
  process.exit(2);
}
if (!/^http:\/\/(127\.[0-9.]+|localhost|\[::1\]):[0-9]+$/.test(base)) {
  console.error('serve-load: loopback only (http://127.0.0.1:PORT)');
  process.exit(2);
}
const clients = Number(clientsText), seconds = Number(secondsText), maxTokens = Number(maxTokensText);
const stream = streamText === '1';
const requestTimeoutMs = 180 * 1000;
const prompts = [
  'The jury said', 'In the morning the', 'He looked at the', 'The state legislature', 'She had never',
  'The church was', 'Mr. Brown', 'It was the first time', 'The committee', 'After the war',
];

function rssKb() {
  try {
    const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pidText}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch (e) {
    return null;
  }
}

// The server's CPU time (user + system, seconds; CLK_TCK from the environment, else 100) and the
// machine's 1-minute load average: the run's share of the cores, and how busy the machine was besides.
function cpuSeconds() {
  try {
    const f = fs.readFileSync(`/proc/${pidText}/stat`, 'utf8');
    const after = f.slice(f.lastIndexOf(')') + 2).split(' ');  // fields from the 3rd (state) on
    return (Number(after[11]) + Number(after[12])) / Number(process.env.CLK_TCK || 100);
  } catch (e) {
    return null;
  }
}
function loadAverage() {
  try {
    return Number(fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
  } catch (e) {
    return null;
  }
}

async function one(i, k) {
  const body = {
    model: 'default', prompt: prompts[(i + k) % prompts.length], max_tokens: maxTokens,
    temperature: 0.8, top_p: 0.95, seed: i * 100000 + k, stream,
  };
  if (stream) body.stream_options = { include_usage: true };
  const t0 = process.hrtime.bigint();
  const res = await fetch(`${base}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    signal: AbortSignal.timeout(requestTimeoutMs),
  });
  // The body as it arrives, and when its first generated text came (streamed: the first event with text;
  // the server may send ": waiting" comments before it while the request is queued).
  let text = '', first = null;
  const decoder = new TextDecoder();
  for await (const part of res.body) {
    text += decoder.decode(part, { stream: true });
    if (first === null && (!stream || /"text":"[^"]/.test(text)))
      first = Number(process.hrtime.bigint() - t0) / 1e6;
  }
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (res.status !== 200) return { ok: false, ms, status: res.status, text };
  let tokens = 0;
  if (stream) {
    const usage = text.split('\n').filter((l) => l.startsWith('data: {') && l.includes('"usage"'));
    if (!usage.length || !text.includes('data: [DONE]')) return { ok: false, ms, status: 200, text };
    tokens = JSON.parse(usage[usage.length - 1].slice(6)).usage.completion_tokens;
  } else {
    tokens = JSON.parse(text).usage.completion_tokens;
  }
  return { ok: true, ms, first, tokens };
}

async function main() {
  const rss = [];
  const sample = () => rss.push(rssKb());
  sample();
  const cpu0 = cpuSeconds(), load0 = loadAverage();
  const timer = setInterval(sample, 1000);
  const start = Date.now(), end = start + seconds * 1000;
  const lat = [], firsts = [];
  let tokens = 0, errors = 0;
  const errorSamples = [];
  await Promise.all(Array.from({ length: clients }, async (_, i) => {
    for (let k = 0; Date.now() < end; ++k) {
      try {
        const r = await one(i, k);
        if (r.ok) {
          lat.push(r.ms);
          if (r.first !== null) firsts.push(r.first);
          tokens += r.tokens;
        } else {
          errors += 1;
          if (errorSamples.length < 5) errorSamples.push(`${r.status} ${r.text.slice(0, 200)}`);
        }
      } catch (e) {
        errors += 1;
        if (errorSamples.length < 5) errorSamples.push(String(e));
      }
    }
  }));
  clearInterval(timer);
  sample();
  const wall = (Date.now() - start) / 1000;
  const cpu1 = cpuSeconds(), load1 = loadAverage();
  lat.sort((a, b) => a - b);
  firsts.sort((a, b) => a - b);
  const q = (p, v = lat) => (v.length ? v[Math.min(v.length - 1, Math.floor(p * v.length))] : null);
  const valid = rss.filter((x) => x !== null);
  process.stdout.write(JSON.stringify({
    clients, seconds: wall, max_tokens: maxTokens, stream, requests: lat.length, errors,
    requests_per_s: lat.length / wall, tokens_per_s: tokens / wall, tokens,
    latency_ms: { p50: q(0.5), p90: q(0.9), p99: q(0.99), max: lat.length ? lat[lat.length - 1] : null },
    // Streamed: until the first generated text arrived.
    first_text_ms: stream ? { p50: q(0.5, firsts), p99: q(0.99, firsts) } : undefined,
    // At the start (before any request), after 10 s (warm: LibTorch's and the allocator's first
    // allocations made), at the end; and every 10 s.
    rss_kb: {
      start: valid[0], warm: valid[Math.min(10, valid.length - 1)], end: valid[valid.length - 1],
      every_10s: valid.filter((_, i) => i % 10 === 0),
    },
    server_cpu_s: cpu0 === null || cpu1 === null ? null : cpu1 - cpu0,
    load_average_1min: { start: load0, end: load1 },
    error_samples: errorSamples,
  }) + '\n');
}

main().catch((e) => {
  console.error(String((e && e.stack) || e));
  process.exit(1);
});
