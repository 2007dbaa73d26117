// Loads every workshop template (crates/templates/workflows/*.json) into the real frontend served
// by a running `comfyume serve`, as one logged-in participant, and checks that the frontend knows
// every node type, keeps every widget value exactly (the file's widgets_values come back from
// graph.serialize() unchanged) and turns the graph into an API prompt without errors.
//
//   BASE_URL=http://127.0.0.1:PORT USER1=user001 PASS1=... [OUT_DIR=...] [TEMPLATES_DIR=...] \
//   node tests/browser/templates.mjs
//
// Exit codes: 0 all templates load cleanly (JSON summary on stdout); 1 a template failed or the
// page threw (reason on stderr, screenshots in OUT_DIR); 2 bad usage.

import { chromium } from 'playwright-core';
import { mkdirSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const env = process.env;
const missing = ['BASE_URL', 'USER1', 'PASS1'].filter((k) => !env[k]);
if (missing.length) {
  console.error(`templates: missing environment variables: ${missing.join(', ')}`);
  process.exit(2);
}
const BASE_URL = env.BASE_URL.replace(/\/+$/, '');
const OUT_DIR = path.resolve(env.OUT_DIR || 'templates-out');
const TIMEOUT = Number(env.STORY_TIMEOUT_MS || 60_000);
const DIR = env.TEMPLATES_DIR
  ? path.resolve(env.TEMPLATES_DIR)
  : path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../crates/templates/workflows');
mkdirSync(OUT_DIR, { recursive: true });

const isLoopback = (url) => {
  const u = new URL(url);
  if (!/^(https?|wss?):$/.test(u.protocol)) return true;
  const h = u.hostname.replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
};

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
  ],
});
const failures = [];
const pageErrors = [];
const results = [];
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  await context.route((u) => !isLoopback(u.href), (r) => r.abort('blockedbyclient'));
  page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(String(e.stack || e)));

  await page.goto(`${BASE_URL}/${env.USER1}/`, { timeout: TIMEOUT });
  await page.locator('input[name=username]').fill(env.USER1, { timeout: TIMEOUT });
  await page.locator('input[name=password]').fill(env.PASS1);
  await page.locator('button[type=submit]').click();
  await page.waitForFunction(
    () =>
      !!window.app?.graph &&
      !!window.app.extensionManager?.workflow?.activeWorkflow &&
      Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100,
    null,
    { timeout: TIMEOUT },
  );

  for (const file of readdirSync(DIR).filter((f) => f.endsWith('.json')).sort()) {
    const wf = JSON.parse(readFileSync(path.join(DIR, file), 'utf8'));
    const errorsBefore = pageErrors.length;
    const r = await page.evaluate(
      async ([wf, name]) => {
        const out = { problems: [] };
        // Loading without the missing-models/-nodes dialogs: models are absent on a CPU server.
        await window.app.loadGraphData(structuredClone(wf), true, true, name, {
          showMissingModelsDialog: false,
          showMissingNodesDialog: false,
        });
        const graph = window.app.graph;
        for (const n of graph.nodes) {
          if (!window.LiteGraph.registered_node_types[n.type]) out.problems.push(`unknown node type ${n.type}`);
        }
        const saved = graph.serialize();
        for (const n of wf.nodes) {
          const s = saved.nodes.find((x) => x.id === n.id);
          const before = JSON.stringify(n.widgets_values ?? []);
          const after = JSON.stringify(s?.widgets_values ?? []);
          if (before !== after) out.problems.push(`node ${n.id} ${n.type}: widgets_values ${before} became ${after}`);
        }
        if (saved.links.length !== wf.links.length) {
          out.problems.push(`${wf.links.length} links in the file, ${saved.links.length} after loading`);
        }
        const prompt = await window.app.graphToPrompt();
        out.nodes = graph.nodes.length;
        out.links = saved.links.length;
        out.prompt_nodes = Object.keys(prompt.output).length;
        return out;
      },
      [wf, file.replace(/\.json$/, '')],
    );
    for (const e of pageErrors.slice(errorsBefore)) r.problems.push(`page error: ${e}`);
    await page.screenshot({ path: path.join(OUT_DIR, `${file.replace(/[^A-Za-z0-9]+/g, '_')}.png`) });
    for (const p of r.problems) failures.push(`${file}: ${p}`);
    results.push({ file, nodes: r.nodes, links: r.links, prompt_nodes: r.prompt_nodes, ok: r.problems.length === 0 });
  }
} catch (err) {
  failures.push(String(err?.stack || err));
  if (page && !page.isClosed()) await page.screenshot({ path: path.join(OUT_DIR, 'failure.png') }).catch(() => {});
} finally {
  await browser.close().catch(() => {});
}

if (failures.length) {
  console.error(`templates: FAILED:\n  ${failures.join('\n  ')}`);
  process.exit(1);
}
console.log(JSON.stringify({ ok: true, templates: results }, null, 2));
process.exit(0);
