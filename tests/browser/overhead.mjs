// Benchmark, not a test: Run -> result in the stock frontend, straight at a ComfyUI (the
// simulator serving the frontend itself, `comfyume-sim --front-end-root`) against the same
// workflow through `comfyume serve` in front of a ComfyUI of the same build and settings, in
// alternating pairs. (Not the same one: ComfyUI sends its queue `status` to every socket, and
// the idle straight tab would fetch the queue, history and newest image on every job serve ran.)
//
//   DIRECT_URL=http://127.0.0.1:P1 BASE_URL=http://127.0.0.1:P2 USER1=user001 PASS1=... \
//     PAIRS=5 TEMPLATE="Flux.2 Klein 4B - text to image" node tests/browser/overhead.mjs
//
// Each run loads the template into the page's graph (app.loadGraphData, with a seed no run used
// before, so nothing comes from ComfyUI's cache), presses the real Run button, and takes the time
// in the page's clock from the press to the Save Image node showing the loaded result image.
// Pairs alternate which path goes first. Prints a JSON summary with every pair and the median
// ratio (through ComfyUMe / straight). TRACE=1 logs every request and WebSocket frame of each
// run (stderr), in Node's clock from the press of Run.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cfg, fail, log, login, newParticipant, runStory, setup, step, waitForComfy } from './lib.mjs';

const env = process.env;
setup(
  'overhead',
  ['BASE_URL', 'DIRECT_URL', 'USER1', 'PASS1'],
  'DIRECT_URL=.. BASE_URL=.. USER1=.. PASS1=.. [PAIRS=5] [TEMPLATE=..] node overhead.mjs',
);
const PAIRS = Number(env.PAIRS || 5);
const WARMUP = Number(env.WARMUP || 1);
const TEMPLATE = env.TEMPLATE || 'Flux.2 Klein 4B - text to image';
const TEMPLATES_DIR = env.TEMPLATES_DIR
  ? path.resolve(env.TEMPLATES_DIR)
  : path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../crates/templates/workflows');
const workflow = JSON.parse(readFileSync(path.join(TEMPLATES_DIR, `${TEMPLATE}.json`), 'utf8'));
const DIRECT = env.DIRECT_URL.replace(/\/+$/, '');
/** CONTROL_URL: a second ComfyUI the "through" tab opens straight instead of ComfyUMe. */
const CONTROL = env.CONTROL_URL ? env.CONTROL_URL.replace(/\/+$/, '') : null;

/** Every run's phases, by path. */
const phases = { direct: [], comfyume: [] };

let nextSeed = Number(env.SEED_BASE || Date.now() % 1_000_000_000);

/** The template with a seed no run used before (on every seed widget it has). */
function freshGraph() {
  const g = structuredClone(workflow);
  const seed = nextSeed++;
  for (const node of g.nodes) {
    if (node.type === 'RandomNoise' || node.type === 'KSampler' || node.type === 'KSamplerAdvanced') {
      // The seed widget comes first; "fixed" keeps the frontend from changing it after the run.
      node.widgets_values[0] = seed;
      if (typeof node.widgets_values[1] === 'string') node.widgets_values[1] = 'fixed';
    }
  }
  return g;
}

/** TRACE=1: every request and WebSocket frame of each run, in Node's clock from the press. */
const TRACE = env.TRACE === '1';
let traceLog = null;
function traced(page) {
  if (!TRACE) return;
  const at = () => (traceLog ? (performance.now() - traceLog.t0).toFixed(1) : null);
  const put = (what) => traceLog && traceLog.lines.push(`${at()} ${what}`);
  page.on('request', (r) => put(`-> ${r.method()} ${r.url().replace(/^https?:\/\/[^/]+/, '')}`));
  page.on('requestfinished', (r) => put(`<- ${r.url().replace(/^https?:\/\/[^/]+/, '')}`));
  page.on('websocket', (ws) =>
    ws.on('framereceived', (f) => put(`ws ${typeof f.payload === 'string' ? f.payload.slice(0, 90) : `binary ${f.payload.length}`}`)),
  );
}

async function prepare(page) {
  await page.evaluate(() => {
    window.__bench = { clickedAt: null, shownAt: null, file: null, startAt: null, executedAt: null };
    document.addEventListener('pointerdown', () => (window.__bench.clickedAt ??= performance.now()), { capture: true });
    window.comfyAPI.api.api.addEventListener('execution_start', () => (window.__bench.startAt ??= performance.now()));
    window.comfyAPI.api.api.addEventListener('executed', (e) => {
      const img = e.detail?.output?.images?.[0];
      if (img) {
        window.__bench.file = img.filename;
        window.__bench.executedAt ??= performance.now();
      }
    });
  });
}

/** One run on `page`: load, press Run, wait for the image on Save Image. Milliseconds. */
async function once(page, label) {
  const graph = freshGraph();
  const save = graph.nodes.find((n) => n.type === 'SaveImage');
  if (!save) fail(`${TEMPLATE} has no SaveImage node`);
  await page.evaluate(async (g) => {
    await window.app.loadGraphData(g);
    Object.assign(window.__bench, { clickedAt: null, file: null, startAt: null, executedAt: null });
  }, graph);
  if (TRACE) traceLog = { t0: performance.now(), wall: Date.now(), lines: [] };
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  try {
    await page.waitForFunction(
      (id) => {
        const b = window.__bench;
        if (!b.file) return false;
        const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
        const shown = (node?.imgs ?? []).some((img) => {
          const u = new URL(img.src, location.href);
          return img.complete && img.naturalWidth > 0 && u.searchParams.get('filename') === b.file;
        });
        if (shown) b.shownAt ??= performance.now();
        return shown;
      },
      save.id,
      { timeout: cfg.TIMEOUT, polling: 'raf' },
    );
  } catch {
    fail(`${label}: the result never showed on Save Image (node ${save.id})`);
  }
  const r = await page.evaluate(() => {
    const b = window.__bench;
    const out = {
      total: b.shownAt - b.clickedAt,
      // Phases, each from the previous mark: Run -> execution_start -> executed -> image shown.
      to_start: b.startAt - b.clickedAt,
      to_executed: b.executedAt - b.startAt,
      to_shown: b.shownAt - b.executedAt,
    };
    b.shownAt = null;
    return out;
  });
  if (!(r.total > 0)) fail(`${label}: no pointer press was seen before the result`);
  if (TRACE) {
    log(`${label}: ${r.total.toFixed(1)} ms (pressed at ${new Date(traceLog.wall).toISOString()})\n  ${traceLog.lines.join('\n  ')}`);
    traceLog = null;
  }
  phases[label].push(r);
  return r.total;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

runStory(async (browser, summary) => {
  const direct = (await newParticipant(browser, 'direct')).page;
  traced(direct);
  await step('the frontend straight from the ComfyUI loads', async () => {
    await direct.goto(`${DIRECT}/`, { waitUntil: 'domcontentloaded', timeout: cfg.TIMEOUT });
    await waitForComfy(direct, 'direct');
  });
  const through = (await newParticipant(browser, 'comfyume')).page;
  traced(through);
  if (CONTROL) {
    // The control: the second tab straight at the other ComfyUI too, so both paths are the
    // same and every difference between them is the measurement's own noise.
    await step('the second tab straight from the other ComfyUI loads (control)', async () => {
      await through.goto(`${CONTROL}/`, { waitUntil: 'domcontentloaded', timeout: cfg.TIMEOUT });
      await waitForComfy(through, 'comfyume');
    });
  } else {
    await step('the frontend through ComfyUMe loads', async () => {
      await login(through, 'comfyume', env.USER1, env.PASS1);
      await waitForComfy(through, 'comfyume');
    });
  }
  await prepare(direct);
  await prepare(through);
  for (let i = 0; i < WARMUP; i++) {
    await once(direct, 'direct');
    await once(through, 'comfyume');
  }
  const pairs = [];
  for (let i = 0; i < PAIRS; i++) {
    const order = i % 2 === 0 ? ['direct', 'comfyume'] : ['comfyume', 'direct'];
    const p = {};
    for (const which of order) p[which] = await once(which === 'direct' ? direct : through, which);
    p.ratio = p.comfyume / p.direct;
    log(`pair ${i + 1}: straight ${p.direct.toFixed(1)} ms, through ComfyUMe ${p.comfyume.toFixed(1)} ms, ${p.ratio.toFixed(3)}x`);
    pairs.push(p);
  }
  summary.template = TEMPLATE;
  summary.pairs = pairs;
  summary.median_ratio = median(pairs.map((p) => p.ratio));
  summary.median_direct_ms = median(pairs.map((p) => p.direct));
  summary.median_comfyume_ms = median(pairs.map((p) => p.comfyume));
  // Warm-up runs excluded: the last PAIRS runs of each path.
  summary.phases = Object.fromEntries(
    Object.entries(phases).map(([k, runs]) => [
      k,
      Object.fromEntries(['to_start', 'to_executed', 'to_shown'].map((f) => [f, median(runs.slice(-PAIRS).map((r) => r[f]))])),
    ]),
  );
});
