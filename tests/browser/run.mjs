// Browser story against a running `comfyume serve`: a new participant logs in, closes the
// Templates dialog, opens the workshop template "Flux.2 Klein 9B - text to image" from the
// Workflows sidebar, presses Run, watches the progress and sees the result, all within seconds.
//
//   BASE_URL=http://127.0.0.1:PORT USER1=user001 PASS1=... OUT_DIR=/tmp/run node tests/browser/run.mjs
//
// USER1 must be a new participant (the Templates dialog shows), and the server must not have run
// this prompt before: a second identical prompt is answered from ComfyUI's cache, without
// progress. Optional: CHROMIUM, STORY_TIMEOUT_MS (per wait, default 60000), ALLOW_FAILED (see
// lib.mjs), RUN_BUDGET_MS (from pressing Run to the result shown in the UI, default 30000),
// TEMPLATE (default "Flux.2 Klein 9B - text to image"), TEMPLATES_DIR (default
// crates/templates/workflows).
//
// Exit codes: 0 passed (JSON summary on stdout, with the timings); 1 failed (reason on stderr,
// screenshots in OUT_DIR); 2 bad usage.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  cfg,
  fail,
  log,
  login,
  newParticipant,
  openWorkflowsSidebar,
  runStory,
  setup,
  shot,
  step,
  waitForComfy,
} from './lib.mjs';

const env = process.env;
setup('run', ['BASE_URL', 'USER1', 'PASS1'], 'BASE_URL=http://127.0.0.1:PORT USER1=.. PASS1=.. [OUT_DIR=..] node run.mjs');
const USER = env.USER1;
const LABEL = 'user1';
const RUN_BUDGET_MS = Number(env.RUN_BUDGET_MS || 30_000);
const TEMPLATE = env.TEMPLATE || 'Flux.2 Klein 9B - text to image';
const TEMPLATES_DIR = env.TEMPLATES_DIR
  ? path.resolve(env.TEMPLATES_DIR)
  : path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../crates/templates/workflows');
const templateFile = JSON.parse(readFileSync(path.join(TEMPLATES_DIR, `${TEMPLATE}.json`), 'utf8'));
const WORKFLOW_PATH = `workflows/${TEMPLATE}.json`;
const VIEW_PATH = `/${USER}/api/view`;

/** Width and height from a PNG's IHDR chunk, or null if `buf` is no PNG. */
function pngSize(buf) {
  const sig = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (buf.length < 24 || !buf.subarray(0, 8).equals(sig) || buf.toString('latin1', 12, 16) !== 'IHDR') return null;
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

async function openTemplate(page) {
  const tab = await openWorkflowsSidebar(page);
  // The Browse tree lists the saved workflows by file name (PrimeVue sets it as aria-label).
  const entry = tab.locator(`.comfyui-workflows-browse li.p-tree-node[aria-label="${TEMPLATE}.json"]`);
  await entry
    .waitFor({ state: 'visible', timeout: cfg.TIMEOUT })
    .catch(() => fail(`${LABEL}: the Workflows sidebar does not list "${TEMPLATE}.json"`));
  await shot(page, `${LABEL}-workflows-sidebar`);
  await entry.click();
  try {
    await page.waitForFunction(
      ([p, n]) => window.app.extensionManager.workflow.activeWorkflow?.path === p && window.app.graph.nodes.length === n,
      [WORKFLOW_PATH, templateFile.nodes.length],
      { timeout: cfg.TIMEOUT },
    );
  } catch {
    const now = await page.evaluate(() => [window.app.extensionManager.workflow.activeWorkflow?.path, window.app.graph.nodes.length]);
    fail(`${LABEL}: clicking "${TEMPLATE}.json" did not open it with ${templateFile.nodes.length} nodes (open: ${now[0]}, ${now[1]} nodes)`);
  }
  // A missing-models or missing-nodes dialog would show now; a participant must not get one.
  await page.waitForTimeout(500);
  const dialogs = page.locator('.p-dialog:visible');
  if ((await dialogs.count()) > 0) {
    await shot(page, `${LABEL}-template-dialog`);
    fail(`${LABEL}: opening the template showed a dialog: ${(await dialogs.first().innerText()).slice(0, 300)}`);
  }
  // Close the sidebar again so the canvas (with the Save Image node) is in full view.
  await page.locator('.workflows-tab-button').first().click();
  await tab.waitFor({ state: 'hidden', timeout: cfg.TIMEOUT });
  await shot(page, `${LABEL}-template-open`);
  return page.evaluate(() =>
    window.app.graph.nodes.map((n) => ({ id: String(n.id), type: n.type, title: n.title, widgets: Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value])) })),
  );
}

/** Records, in the page, the execution messages the frontend's API client dispatches and what
 * the queue overlay shows as running ("Current node: <title>", "<n> running"). */
async function hookProgress(page) {
  await page.evaluate(() => {
    const run = { events: [], currentNodes: [], maxRunning: 0, clickedAt: null };
    window.__run = run;
    const api = window.comfyAPI.api.api;
    for (const type of [
      'execution_start',
      'execution_cached',
      'executing',
      'progress',
      'executed',
      'execution_success',
      'execution_error',
      'execution_interrupted',
    ]) {
      api.addEventListener(type, (e) =>
        run.events.push({ type, at: performance.now(), detail: JSON.parse(JSON.stringify(e.detail ?? null)) }),
      );
    }
    const xpath = (expr) => {
      const r = document.evaluate(expr, document.body, null, XPathResult.ORDERED_NODE_SNAPSHOT_TYPE, null);
      return Array.from({ length: r.snapshotLength }, (_, i) => r.snapshotItem(i));
    };
    run.observer = new MutationObserver(() => {
      for (const label of xpath("//span[normalize-space()='Current node:']")) {
        const title = label.nextElementSibling?.textContent.trim();
        if (title && run.currentNodes.at(-1)?.title !== title) run.currentNodes.push({ title, at: performance.now() });
      }
      for (const word of xpath("//span[normalize-space()='running']")) {
        const n = Number(word.previousElementSibling?.textContent.trim());
        if (n > run.maxRunning) run.maxRunning = n;
      }
    });
    run.observer.observe(document.body, { subtree: true, childList: true, characterData: true });
    // The moment the Run button is pressed, in the page's clock.
    document.addEventListener('pointerdown', () => (run.clickedAt ??= performance.now()), { capture: true });
  });
}

/** Checks the recorded messages: the job ran every node of the prompt (none from cache), the
 * sampler reported its steps, Save Image sent its image, in ComfyUI's order. */
function checkEvents(events, promptId, promptNodes, graph) {
  const mine = events.filter((e) => typeof e.detail !== 'object' || e.detail === null || !e.detail.prompt_id || e.detail.prompt_id === promptId);
  const idx = (pred) => mine.findIndex(pred);
  const start = idx((e) => e.type === 'execution_start');
  if (start < 0) {
    const seen = events.slice(0, 12).map((e) => `${e.type}${e.detail?.prompt_id ? `(${e.detail.prompt_id.slice(0, 8)})` : ''}`);
    fail(`${LABEL}: no execution_start for prompt ${promptId}; the page's first messages: ${seen.join(', ')}`);
  }
  const cached = mine.find((e) => e.type === 'execution_cached')?.detail?.nodes ?? [];
  if (cached.length >= promptNodes.length) {
    fail(`${LABEL}: every node came from the cache (${cached.length}); run against a server that has not run this prompt`);
  }
  const executing = mine.filter((e) => e.type === 'executing' && typeof e.detail === 'string').map((e) => e.detail);
  const ran = new Set([...executing, ...cached]);
  const missing = promptNodes.filter((id) => !ran.has(id));
  const extra = [...ran].filter((id) => !promptNodes.includes(id));
  if (missing.length || extra.length) {
    fail(`${LABEL}: executing/cached nodes differ from the prompt's: missing ${JSON.stringify(missing)}, extra ${JSON.stringify(extra)}`);
  }
  const sampler = graph.find((n) => n.type === 'SamplerCustomAdvanced' || n.type === 'KSampler');
  const save = graph.find((n) => n.type === 'SaveImage');
  if (!sampler || !save) fail(`${LABEL}: the template has no sampler or no SaveImage node`);
  const progress = mine.filter((e) => e.type === 'progress' && e.detail?.node === sampler.id).map((e) => e.detail);
  if (!progress.length) fail(`${LABEL}: no progress event for the sampler (node ${sampler.id})`);
  const last = progress.at(-1);
  if (last.value !== last.max || progress.some((p, i) => i > 0 && p.value <= progress[i - 1].value)) {
    fail(`${LABEL}: sampler progress is not 1..max in order: ${JSON.stringify(progress)}`);
  }
  const steps = graph.find((n) => n.type === 'Flux2Scheduler')?.widgets?.steps;
  if (steps !== undefined && last.max !== steps) fail(`${LABEL}: sampler progress max ${last.max}, the scheduler has ${steps} steps`);
  const executed = mine.find((e) => e.type === 'executed' && e.detail?.node === save.id);
  const images = executed?.detail?.output?.images ?? [];
  if (!images.length) fail(`${LABEL}: no executed event with images for Save Image (node ${save.id})`);
  const order = [
    ['execution_start', start],
    [`executing ${sampler.id}`, idx((e) => e.type === 'executing' && e.detail === sampler.id)],
    ['first progress', idx((e) => e.type === 'progress')],
    [`executed ${save.id}`, idx((e) => e === executed)],
    ['execution_success', idx((e) => e.type === 'execution_success')],
  ];
  if (order.some(([, i], k) => i < 0 || (k > 0 && i < order[k - 1][1]))) {
    fail(`${LABEL}: execution messages out of order: ${order.map(([n, i]) => `${n}@${i}`).join(', ')}`);
  }
  return { sampler, save, progress, executed, images, executing };
}

runStory(async (browser, summary) => {
  summary.user = USER;
  summary.template = WORKFLOW_PATH;
  const { context, page } = await newParticipant(browser, LABEL);
  // Every image the page itself loads through /api/view, with its status and type.
  const viewed = [];
  context.on('response', (res) => {
    if (new URL(res.url()).pathname.endsWith('/api/view')) {
      viewed.push({ url: res.url(), status: res.status(), type: res.headers()['content-type'] ?? '' });
    }
  });

  await step(`${LABEL} logs in`, () => login(page, LABEL, USER, env.PASS1));
  const loaded = await step(`${LABEL} frontend loads and the Templates dialog is closed`, () => waitForComfy(page, LABEL));
  if (!loaded.closedDialogs.some((d) => /template/i.test(d))) {
    fail(`${LABEL}: no new-user Templates dialog was shown (closed: ${JSON.stringify(loaded.closedDialogs)}); USER1 must be a new participant`);
  }
  summary.closed_dialogs = loaded.closedDialogs;

  const graph = await step(`${LABEL} opens "${TEMPLATE}" from the Workflows sidebar`, () => openTemplate(page));
  await hookProgress(page);

  // --- Run ---------------------------------------------------------------------------------
  const promptPath = `/${USER}/api/prompt`;
  const queued = page.waitForResponse(
    (r) => r.request().method() === 'POST' && new URL(r.url()).pathname === promptPath,
    { timeout: cfg.TIMEOUT },
  );
  const storageText = () =>
    // The banner's text node (its links follow it).
    page.evaluate(() => /Storage: [^·]*/.exec(document.getElementById('comfyume-banner')?.firstChild?.textContent ?? '')?.[0]?.trim() ?? null);
  const storageBefore = await storageText();
  if (!storageBefore) fail(`${LABEL}: the banner shows no storage line before Run`);
  const t0 = Date.now();
  const { promptId, promptNodes } = await step(`${LABEL} presses Run`, async () => {
    await page.getByRole('button', { name: 'Run', exact: true }).click();
    const res = await queued.catch(() => fail(`${LABEL}: pressing Run sent no POST ${promptPath}`));
    const body = await res.json().catch(() => ({}));
    if (res.status() !== 200 || !body.prompt_id) fail(`${LABEL}: POST ${promptPath} answered ${res.status()} ${JSON.stringify(body)}`);
    return { promptId: body.prompt_id, promptNodes: Object.keys(res.request().postDataJSON().prompt) };
  });
  log(`queued prompt ${promptId} (${promptNodes.length} nodes)`);
  summary.prompt_id = promptId;

  const run = await step(`${LABEL} watches the progress until the job finishes`, async () => {
    const ended = (id) =>
      window.__run.events.some((e) => /^execution_(success|error|interrupted)$/.test(e.type) && e.detail?.prompt_id === id);
    const waitFor = (fn) =>
      page.waitForFunction(fn, promptId, { timeout: Math.max(1, RUN_BUDGET_MS - (Date.now() - t0)) }).catch(() =>
        fail(`${LABEL}: job ${promptId} did not finish within ${RUN_BUDGET_MS} ms of pressing Run`),
      );
    // A screenshot mid-run shows the running node and the progress overlay (if the job is
    // still running by then).
    await waitFor((id) =>
      window.__run.events.some(
        (e) => e.type === 'progress' || (/^execution_(success|error|interrupted)$/.test(e.type) && e.detail?.prompt_id === id),
      ),
    );
    await shot(page, `${LABEL}-running`);
    await waitFor(ended);
    const r = await page.evaluate(() => {
      const { events, currentNodes, maxRunning, clickedAt } = window.__run;
      window.__run.observer.disconnect();
      return { events, currentNodes, maxRunning, clickedAt };
    });
    if (r.clickedAt === null) fail(`${LABEL}: the page saw no pointer press on Run`);
    const end = r.events.find((e) => /^execution_(success|error|interrupted)$/.test(e.type) && e.detail?.prompt_id === promptId);
    if (end.type !== 'execution_success') fail(`${LABEL}: job ended with ${end.type}: ${JSON.stringify(end.detail).slice(0, 600)}`);
    r.checked = checkEvents(r.events, promptId, promptNodes, graph);
    r.runMs = Math.round(end.at - r.clickedAt);
    // "A node shows as running": the queue overlay named a node of this graph as the current one.
    const titles = new Set(graph.map((n) => n.title));
    const shown = r.currentNodes.filter((c) => titles.has(c.title));
    if (!shown.length || r.maxRunning < 1) {
      fail(`${LABEL}: the UI never showed a running node (current nodes seen: ${JSON.stringify(r.currentNodes)}, running count ${r.maxRunning})`);
    }
    return r;
  });
  const { images, sampler, save, progress, executing } = run.checked;
  const image = images[0];
  const expected = new URL(`${cfg.BASE_URL}${VIEW_PATH}`);
  for (const k of ['filename', 'subfolder', 'type']) expected.searchParams.set(k, image[k] ?? '');
  summary.run = {
    run_ms: run.runMs, // Run pressed -> execution_success, in the page's clock
    executing_nodes: executing.length,
    sampler_progress: progress.map((p) => `${p.value}/${p.max}`),
    progress_span_ms: Math.round(
      run.events.filter((e) => e.type === 'progress').at(-1).at - run.events.find((e) => e.type === 'progress').at,
    ),
    current_nodes_shown: run.currentNodes.map((c) => c.title).filter((t) => t !== "—"),
    executed: run.checked.executed.detail,
  };

  await step(`${LABEL} gets the image through ${VIEW_PATH}`, async () => {
    const res = await context.request.get(expected.href, { failOnStatusCode: false });
    const body = await res.body();
    const type = res.headers()['content-type'] ?? '';
    if (res.status() !== 200 || !type.startsWith('image/png')) {
      fail(`${LABEL}: GET ${expected.href} answered ${res.status()} ${type}: ${body.toString('utf8', 0, 200)}`);
    }
    const size = pngSize(body);
    if (!size) fail(`${LABEL}: GET ${expected.href} is not a PNG (${body.length} bytes)`);
    summary.image = { url: expected.href, bytes: body.length, ...size };
  });

  await step(`${LABEL} sees the result on the Save Image node`, async () => {
    try {
      await page.waitForFunction(
        ([id, filename, prefix]) => {
          const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
          return (node?.imgs ?? []).some((img) => {
            const u = new URL(img.src, location.href);
            return img.complete && img.naturalWidth > 0 && u.pathname === prefix && u.searchParams.get('filename') === filename;
          });
        },
        [save.id, image.filename, VIEW_PATH],
        { timeout: Math.max(1, RUN_BUDGET_MS - (Date.now() - t0)) },
      );
    } catch {
      const imgs = await page.evaluate((id) => (window.app.graph.getNodeById(Number(id))?.imgs ?? []).map((i) => i.src), save.id);
      fail(`${LABEL}: Save Image (node ${save.id}) shows no loaded preview of ${image.filename} from ${VIEW_PATH} (imgs: ${JSON.stringify(imgs)})`);
    }
    summary.run.preview_ms = Date.now() - t0;
    // The frontend itself fetched it, from the participant's own prefix, as a PNG.
    const own = viewed.filter((v) => new URL(v.url).searchParams.get('filename') === image.filename);
    const bad = own.filter((v) => new URL(v.url).pathname !== VIEW_PATH || v.status !== 200 || !v.type.startsWith('image/png'));
    if (!own.length || bad.length) fail(`${LABEL}: the page's own loads of ${image.filename}: ${JSON.stringify(own)}`);
    summary.run.page_loads = own.map((v) => `${v.status} ${v.type} ${v.url}`);
    await shot(page, `${LABEL}-result-on-canvas`);
  });

  await step(`${LABEL}'s banner counts the new output in their storage, after the job`, async () => {
    // The banner waits for the job's events to go quiet, then refreshes once.
    await page
      .waitForFunction(
        ([before, user]) => {
          const text = document.getElementById('comfyume-banner')?.firstChild?.textContent ?? '';
          const now = /Storage: [^·]*/.exec(text)?.[0]?.trim();
          return text.includes(`Signed in as ${user}`) && now && now !== before;
        },
        [storageBefore, USER],
        { timeout: 5_000 },
      )
      .catch(async () => fail(`${LABEL}: the banner still says ${JSON.stringify(await storageText())} (before Run: ${JSON.stringify(storageBefore)})`));
    summary.run.banner_storage = [storageBefore, await storageText()];
  });

  await step(`${LABEL} sees the result in the Assets sidebar`, async () => {
    await page.locator('.assets-tab-button').first().click();
    const sidebar = page.locator('.comfy-vue-side-bar-container');
    await sidebar.first().waitFor({ state: 'visible', timeout: cfg.TIMEOUT });
    try {
      await page.waitForFunction(
        ([filename, prefix]) =>
          [...document.querySelectorAll('.comfy-vue-side-bar-container img')].some((img) => {
            const u = new URL(img.src, location.href);
            const box = img.getBoundingClientRect();
            return u.pathname === prefix && u.searchParams.get('filename') === filename && img.complete && img.naturalWidth > 0 && box.width > 0 && box.height > 0;
          }),
        [image.filename, VIEW_PATH],
        { timeout: Math.max(1, RUN_BUDGET_MS - (Date.now() - t0)) },
      );
    } catch {
      const seen = await page.evaluate(() => [...document.querySelectorAll('.comfy-vue-side-bar-container img')].map((i) => i.src));
      fail(`${LABEL}: the Assets sidebar shows no loaded ${image.filename} from ${VIEW_PATH} (images: ${JSON.stringify(seen)})`);
    }
    summary.run.result_visible_ms = Date.now() - t0;
    await shot(page, `${LABEL}-result-in-assets`);
  });

  if (summary.run.result_visible_ms > RUN_BUDGET_MS) {
    fail(`${LABEL}: the result showed ${summary.run.result_visible_ms} ms after pressing Run, over the ${RUN_BUDGET_MS} ms budget`);
  }
  log(
    `run: execution_success ${run.runMs} ms after pressing Run (sampler ${sampler.id}, ${progress.length} progress events); ` +
      `preview on the canvas after ${summary.run.preview_ms} ms; in the Assets sidebar after ${summary.run.result_visible_ms} ms`,
  );
});
