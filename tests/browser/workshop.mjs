// Browser story of issue 12 against a running `comfyume serve`: a new participant signs in
// through the login page; the first-run Templates browser lists the five workshop templates
// (with their thumbnails); they open "Flux.2 Klein 4B - text to image" from it and press the
// real Run button; the result image shows on the canvas; the Model Library lists the backend's
// diffusion models; the Assets panel shows the result; a page reloaded while a job runs shows
// its progress at once (and follows it to the end); "Download my work" from the Workflow menu
// yields a zip holding that result.
//
//   BASE_URL=http://127.0.0.1:PORT USER1=user001 PASS1=... OUT_DIR=/tmp/w node tests/browser/workshop.mjs
//
// USER1 must be a new participant. Fails on any uncaught page error and any failed request
// other than the known harmless 404s (see lib.mjs). Exit codes as run.mjs.

import {
  cfg,
  fail,
  log,
  login,
  navigate,
  newParticipant,
  runStory,
  setup,
  shot,
  step,
  unzip,
  waitForComfy,
} from './lib.mjs';

const env = process.env;
setup('workshop', ['BASE_URL', 'USER1', 'PASS1'], 'BASE_URL=.. USER1=.. PASS1=.. [OUT_DIR=..] node workshop.mjs');
const USER = env.USER1;
const LABEL = 'user1';
const TEMPLATE = 'Flux.2 Klein 4B - text to image';
const WORKSHOP = [
  'Start here - empty canvas',
  'Flux.2 Klein 9B - text to image',
  'Flux.2 Klein 4B - text to image',
  'LTX-2 - text to video',
  'LTX-2 - text to video (distilled)',
];
const DIFFUSION_MODELS = ['flux-2-klein-4b', 'flux-2-klein-9b', 'flux-2-klein-base-9b'];
const VIEW_PATH = `/${USER}/api/view`;

/** Records in the page the execution messages its API client dispatches. */
async function hookEvents(page) {
  await page.evaluate(() => {
    const events = [];
    window.__events = events;
    for (const type of ['execution_start', 'executing', 'progress', 'progress_state', 'executed', 'execution_success', 'execution_error', 'execution_interrupted']) {
      window.comfyAPI.api.api.addEventListener(type, (e) => events.push({ type, at: performance.now(), detail: JSON.parse(JSON.stringify(e.detail ?? null)) }));
    }
  });
}

/** Presses the real Run button; the prompt id and the prompt the page sent. */
async function pressRun(page) {
  const promptPath = `/${USER}/api/prompt`;
  const queued = page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname === promptPath, { timeout: cfg.TIMEOUT });
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  const res = await queued.catch(() => fail(`pressing Run sent no POST ${promptPath}`));
  const body = await res.json().catch(() => ({}));
  if (res.status() !== 200 || !body.prompt_id) fail(`POST ${promptPath} answered ${res.status()} ${JSON.stringify(body)}`);
  return { promptId: body.prompt_id, prompt: res.request().postDataJSON().prompt };
}

async function waitEnd(page, promptId) {
  await page
    .waitForFunction((id) => window.__events.some((e) => /^execution_(success|error|interrupted)$/.test(e.type) && e.detail?.prompt_id === id), promptId, {
      timeout: cfg.TIMEOUT,
    })
    .catch(() => fail(`job ${promptId} did not finish`));
  const events = await page.evaluate(() => window.__events);
  const end = events.find((e) => /^execution_(success|error|interrupted)$/.test(e.type) && e.detail?.prompt_id === promptId);
  if (end.type !== 'execution_success') fail(`job ${promptId} ended with ${end.type}: ${JSON.stringify(end.detail).slice(0, 500)}`);
  return events;
}

runStory(async (browser, summary) => {
  summary.user = USER;
  const { context, page } = await newParticipant(browser, LABEL);

  await step(`${LABEL} signs in through the login page`, () => login(page, LABEL, USER, env.PASS1));

  // --- 1. The first screen: the Templates browser with the workshop's templates ------------
  const shown = await step(`${LABEL}'s first screen lists the five workshop templates`, async () => {
    await page.locator('canvas#graph-canvas').waitFor({ state: 'visible', timeout: cfg.TIMEOUT });
    const dialog = page.locator('.p-dialog:visible', { has: page.locator('[data-testid^="template-workflow-"]') });
    await dialog.first().waitFor({ state: 'visible', timeout: cfg.TIMEOUT }).catch(() => fail('no Templates browser on the first screen'));
    const cards = dialog.locator('[data-testid^="template-workflow-"]');
    await page
      .waitForFunction(
        (n) => [...document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"] img')].filter((i) => i.complete && i.naturalWidth > 0).length >= n,
        WORKSHOP.length,
        { timeout: cfg.TIMEOUT },
      )
      .catch(() => fail('the workshop templates show no loaded thumbnails'));
    const listed = await cards.evaluateAll((cs) =>
      cs.map((c) => ({
        name: c.dataset.testid.replace(/^template-workflow-/, ''),
        text: c.innerText,
        thumbnail: [...c.querySelectorAll('img')].map((i) => ({ w: i.naturalWidth, ok: i.complete })),
      })),
    );
    const names = listed.map((c) => c.name);
    if (JSON.stringify(names.slice(0, WORKSHOP.length)) !== JSON.stringify(WORKSHOP)) {
      fail(`the Templates browser lists ${JSON.stringify(names)}, not the workshop's five first`);
    }
    for (const c of listed.slice(0, WORKSHOP.length)) {
      if (!c.text.includes(c.name) || !c.text.includes('Workshop')) fail(`card ${c.name} reads ${JSON.stringify(c.text)}`);
      if (!c.thumbnail.some((t) => t.ok && t.w > 0)) fail(`card ${c.name} has no thumbnail`);
    }
    await shot(page, `${LABEL}-templates-browser`);
    return listed;
  });
  summary.templates = shown.map((c) => c.name);

  const graph = await step(`${LABEL} opens "${TEMPLATE}" from the Templates browser`, async () => {
    await page.locator(`[data-testid="template-workflow-${TEMPLATE}"]`).click();
    await page
      .waitForFunction((name) => (window.app.extensionManager.workflow.activeWorkflow?.path ?? '').includes(name) && window.app.graph.nodes.length > 10, TEMPLATE, {
        timeout: cfg.TIMEOUT,
      })
      .catch(() => fail(`opening the "${TEMPLATE}" card did not load it`));
    await page.waitForTimeout(500);
    if ((await page.locator('.p-dialog:visible').count()) > 0) {
      await shot(page, `${LABEL}-dialog-after-template`);
      fail(`a dialog is still open after opening the template: ${(await page.locator('.p-dialog:visible').first().innerText()).slice(0, 200)}`);
    }
    await shot(page, `${LABEL}-template-open`);
    return page.evaluate(() => window.app.graph.nodes.map((n) => ({ id: String(n.id), type: n.type })));
  });
  const save = graph.find((n) => n.type === 'SaveImage');
  const sampler = graph.find((n) => n.type === 'SamplerCustomAdvanced');
  if (!save || !sampler) fail(`the template has no SaveImage or sampler: ${JSON.stringify(graph)}`);

  // --- 2. Run: the result on the canvas ----------------------------------------------------
  await hookEvents(page);
  const first = await step(`${LABEL} presses Run and sees the result on the Save Image node`, async () => {
    const { promptId } = await pressRun(page);
    const events = await waitEnd(page, promptId);
    const executed = events.find((e) => e.type === 'executed' && String(e.detail?.node) === save.id);
    const image = executed?.detail?.output?.images?.[0];
    if (!image) fail(`no executed image for Save Image: ${JSON.stringify(executed)}`);
    await page
      .waitForFunction(
        ([id, filename, prefix]) => {
          const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
          return (node?.imgs ?? []).some((img) => {
            const u = new URL(img.src, location.href);
            return img.complete && img.naturalWidth > 0 && u.pathname === prefix && u.searchParams.get('filename') === filename;
          });
        },
        [save.id, image.filename, VIEW_PATH],
        { timeout: cfg.TIMEOUT },
      )
      .catch(() => fail(`the Save Image node shows no loaded ${image.filename}`));
    await shot(page, `${LABEL}-result-on-canvas`);
    return { promptId, image };
  });
  summary.result = first.image;

  // --- 3. The Model Library ------------------------------------------------------------------
  summary.model_library = await step(`${LABEL}'s Model Library lists the backend's diffusion models`, async () => {
    await page.locator('.model-library-tab-button').first().click();
    const folder = page.locator('.p-tree-node', { hasText: 'diffusion_models' }).first();
    await folder.waitFor({ state: 'visible', timeout: cfg.TIMEOUT }).catch(() => fail('the Model Library shows no diffusion_models folder'));
    await folder.click();
    for (const m of DIFFUSION_MODELS) {
      await page
        .locator('.p-tree-node', { hasText: m })
        .first()
        .waitFor({ state: 'visible', timeout: cfg.TIMEOUT })
        .catch(() => fail(`the Model Library does not list ${m}`));
    }
    const texts = await page.locator('.p-tree-node').allInnerTexts();
    await shot(page, `${LABEL}-model-library`);
    await page.locator('.model-library-tab-button').first().click();
    return texts.filter((t) => DIFFUSION_MODELS.includes(t));
  });

  // --- 4. The Assets panel -------------------------------------------------------------------
  await step(`${LABEL}'s Assets panel shows the result`, async () => {
    await page.locator('.assets-tab-button').first().click();
    await page
      .waitForFunction(
        ([filename, prefix]) =>
          [...document.querySelectorAll('.comfy-vue-side-bar-container img')].some((img) => {
            const u = new URL(img.src, location.href);
            return u.pathname === prefix && u.searchParams.get('filename') === filename && img.complete && img.naturalWidth > 0;
          }),
        [first.image.filename, VIEW_PATH],
        { timeout: cfg.TIMEOUT },
      )
      .catch(() => fail(`the Assets panel shows no ${first.image.filename}`));
    await shot(page, `${LABEL}-assets`);
    await page.locator('.assets-tab-button').first().click();
  });

  // --- 5. A reload while a job runs ------------------------------------------------------------
  summary.reload = await step(`${LABEL} reloads while a job runs and sees its progress at once`, async () => {
    // A long run: 200 sampler steps.
    await page.evaluate(() => {
      const n = window.app.graph.nodes.find((x) => x.type === 'Flux2Scheduler');
      n.widgets.find((w) => w.name === 'steps').value = 200;
    });
    await page.evaluate(() => (window.__events.length = 0));
    const { promptId } = await pressRun(page);
    await page
      .waitForFunction((id) => window.__events.some((e) => e.type === 'progress' && e.detail?.prompt_id === id && e.detail.value >= 2), promptId, {
        timeout: cfg.TIMEOUT,
      })
      .catch(() => fail('the long job reported no progress'));
    // The reloaded page's socket: the first messages it hears.
    const frames = [];
    const onSocket = (ws) => {
      ws.on('framereceived', (f) => {
        if (typeof f.payload === 'string' && frames.length < 12) frames.push(JSON.parse(f.payload));
      });
    };
    page.on('websocket', onSocket);
    const reloadedAt = Date.now();
    await navigate(() => page.reload({ waitUntil: 'domcontentloaded', timeout: cfg.TIMEOUT }));
    await page.waitForFunction(() => !!window.comfyAPI?.api?.api && !!window.app?.graph, null, { timeout: cfg.TIMEOUT });
    await hookEvents(page);
    // The overlay names a running node with its progress, without waiting for the job's end.
    await page
      .waitForFunction(
        () => {
          const label = [...document.querySelectorAll('span')].find((s) => s.textContent.trim() === 'Current node:');
          return label && /\d+%/.test(label.parentElement?.textContent ?? '');
        },
        null,
        { timeout: cfg.TIMEOUT },
      )
      .catch(() => fail('after the reload, no running node with its progress is shown'));
    const shownMs = Date.now() - reloadedAt;
    await shot(page, `${LABEL}-reloaded-mid-job`);
    page.off('websocket', onSocket);
    // What the server sent first: status, then the running job's step and progress.
    const types = frames.map((f) => f.type);
    const at = (t) => types.indexOf(t);
    if (at('status') !== 0 || at('execution_start') < 0 || at('executing') < 0 || at('progress_state') < 0) {
      fail(`the reloaded page's first messages: ${JSON.stringify(types)}`);
    }
    const replay = frames.slice(1, 4);
    if (replay.map((f) => f.type).join() !== 'execution_start,executing,progress_state' || replay.some((f) => f.data?.prompt_id !== promptId)) {
      fail(`the catch-up after status is ${JSON.stringify(replay)}`);
    }
    const state = replay[2].data.nodes[sampler.id];
    if (state?.state !== 'running' || !(state.value >= 2)) fail(`progress_state shows the sampler as ${JSON.stringify(state)}`);
    // And it follows the job to its end.
    await waitEnd(page, promptId);
    return { shown_after_reload_ms: shownMs, catch_up: replay.map((f) => f.type), sampler_value_at_reload: state.value };
  });

  // --- 6. Download my work ---------------------------------------------------------------------
  summary.download = await step(`${LABEL} downloads their work from the Workflow menu`, async () => {
    await page.locator('.comfyui-logo-wrapper, .comfy-menu-button-wrapper, [data-testid="comfy-menu-button"]').first().click();
    await page.locator('.p-tieredmenu-item', { hasText: 'Workflow' }).first().hover();
    const item = page.getByRole('menuitem', { name: 'Download my work' });
    await item.waitFor({ state: 'visible', timeout: cfg.TIMEOUT }).catch(() => fail('the Workflow menu has no "Download my work"'));
    await shot(page, `${LABEL}-menu`);
    const download = page.waitForEvent('download', { timeout: cfg.TIMEOUT });
    await item.click();
    const d = await download.catch(() => fail('"Download my work" started no download'));
    const file = `${cfg.OUT_DIR}/${d.suggestedFilename()}`;
    await d.saveAs(file);
    const { readFileSync } = await import('node:fs');
    const entries = await unzip(readFileSync(file));
    const want = `outputs/${first.image.subfolder ? `${first.image.subfolder}/` : ''}${first.image.filename}`;
    const entry = entries.find((e) => e.name === want);
    if (!entry) fail(`the zip lacks ${want}: ${JSON.stringify(entries.map((e) => e.name))}`);
    const view = new URL(`${cfg.BASE_URL}${VIEW_PATH}`);
    for (const k of ['filename', 'subfolder', 'type']) view.searchParams.set(k, first.image[k] ?? '');
    const res = await context.request.get(view.href);
    if (!Buffer.from(await res.body()).equals(entry.data)) fail(`${want} in the zip differs from ${view.href}`);
    if (!entries.some((e) => e.name.startsWith('workflows/'))) fail('the zip holds no saved workflow');
    return { file: d.suggestedFilename(), entries: entries.map((e) => e.name) };
  });
  log(`workshop story: ${summary.templates.length} templates, result ${first.image.filename}, reload caught up in ${summary.reload.shown_after_reload_ms} ms`);
});
