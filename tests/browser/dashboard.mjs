// The instructor's story against a running `comfyume serve` (issue 11), in headless Chromium:
// the admin page shows user001's new job within a second; the admin cancels it and user001's
// page hears the cancellation; the admin switches the policy and pauses the queue, and the
// dashboard and the room view both show it without a reload; a broadcast appears in user001's
// ComfyUI and goes away when cleared; user001's finished image shows among the results, where a
// hostile file name is plain text; the zip of user001's work holds their outputs.
//
//   BASE_URL=http://127.0.0.1:PORT ADMIN=teacher ADMIN_PASS=... USER1=user001 PASS1=... \
//   OUT_DIR=/tmp/dash [SCREENSHOT=docs/dashboard.png] node tests/browser/dashboard.mjs
//
// The server should run the simulator slowly enough (SIMULATOR_STEP_MS=200) that a 31-step blur
// is still running when the instructor cancels it. Fails on any uncaught page error, any failed
// request, and any dialog a page opens by itself (an `alert` would be injected script).

import { cfg, fail, log, login, navigate, runStory, setup, shot, state, step, waitForComfy, watch, pages } from './lib.mjs';

const env = process.env;
setup(
  'dashboard',
  ['BASE_URL', 'ADMIN', 'ADMIN_PASS', 'USER1', 'PASS1'],
  'BASE_URL=.. ADMIN=.. ADMIN_PASS=.. USER1=.. PASS1=.. [OUT_DIR=..] [SCREENSHOT=..] node dashboard.mjs',
);
const EVENT_MS = Number(env.DASH_EVENT_MS || 1000);
const HOSTILE = '<img src=x onerror=alert(1)>';

const slowBlur = {
  1: { class_type: 'EmptyImage', inputs: { width: 64, height: 64, batch_size: 1, color: 255 } },
  2: { class_type: 'ImageBlur', inputs: { image: ['1', 0], blur_radius: 31, sigma: 10.0 } },
  3: { class_type: 'SaveImage', inputs: { images: ['2', 0], filename_prefix: 'slow' } },
};
const tiny = (prefix) => ({
  1: { class_type: 'EmptyImage', inputs: { width: 64, height: 64, batch_size: 1, color: 3368601 } },
  2: { class_type: 'SaveImage', inputs: { images: ['1', 0], filename_prefix: prefix } },
});

/** Queues `prompt` from the participant's page, with the page's own client id. */
async function queueFromPage(page, prompt) {
  return page.evaluate(async (p) => {
    const api = window.comfyAPI.api.api;
    const res = await api.fetchApi('/prompt', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ client_id: api.clientId, prompt: p }),
    });
    const body = await res.json();
    if (!res.ok) throw new Error(`POST /prompt: ${res.status} ${JSON.stringify(body)}`);
    return body.prompt_id;
  }, prompt);
}

/** Names in a zip's central directory. */
function zipNames(buf) {
  let eocd = -1;
  for (let i = buf.length - 22; i >= 0; i--) {
    if (buf.readUInt32LE(i) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) fail('the download is not a zip (no end of central directory)');
  const count = buf.readUInt16LE(eocd + 10);
  let at = buf.readUInt32LE(eocd + 16);
  const names = [];
  for (let k = 0; k < count; k++) {
    const n = buf.readUInt16LE(at + 28);
    const extra = buf.readUInt16LE(at + 30);
    const comment = buf.readUInt16LE(at + 32);
    names.push(buf.toString('utf8', at + 46, at + 46 + n));
    at += 46 + n + extra + comment;
  }
  return names;
}

async function adminLogin(page) {
  const { TIMEOUT } = cfg;
  await navigate(() => page.goto(`${cfg.BASE_URL}/admin`, { waitUntil: 'domcontentloaded', timeout: TIMEOUT }));
  const form = page.locator('form').filter({ has: page.locator('input[name=username]') });
  await form.waitFor({ state: 'visible', timeout: TIMEOUT }).catch(() => fail(`/admin showed no login form (at ${page.url()})`));
  await form.locator('input[name=username]').fill(env.ADMIN);
  await form.locator('input[name=password]').fill(env.ADMIN_PASS);
  await navigate(async () => {
    await Promise.all([
      page.waitForURL((u) => u.pathname === '/admin', { timeout: TIMEOUT }),
      form.locator('button[type=submit]').click(),
    ]).catch(() => fail(`admin login did not land on /admin (now at ${page.url()})`));
  });
  state.loggedIn.add('admin');
  await page.locator('#live.on').waitFor({ timeout: TIMEOUT }).catch(() => fail('the dashboard never went live'));
}

runStory(async (browser, summary) => {
  const { TIMEOUT } = cfg;
  const dialogs = [];
  const ctx = async (label, viewport) => {
    const context = await browser.newContext({ viewport });
    watch(context, label);
    context.on('page', (p) => p.on('dialog', (d) => { dialogs.push(`${label}: ${d.type()} ${d.message()}`); d.dismiss().catch(() => {}); }));
    const page = await context.newPage();
    pages.set(label, page);
    return { context, page };
  };
  const { context: adminCtx, page: dash } = await ctx('admin', { width: 1280, height: 720 });
  const { page: user } = await ctx('user001', { width: 1440, height: 900 });
  let room;

  await step('the instructor signs in to /admin and it goes live', async () => {
    await adminLogin(dash);
    room = await adminCtx.newPage();
    pages.set('room', room);
    await navigate(() => room.goto(`${cfg.BASE_URL}/admin/room`, { waitUntil: 'domcontentloaded' }));
    await room.locator('#live.on').waitFor({ timeout: TIMEOUT });
    await shot(room, 'room-view');
  });

  await step('user001 signs in to their ComfyUI', async () => {
    await login(user, 'user001', env.USER1, env.PASS1);
    await waitForComfy(user, 'user001');
    await user.evaluate(() => {
      window.__events = [];
      const api = window.comfyAPI.api.api;
      for (const t of ['status', 'execution_interrupted', 'execution_start', 'executing']) {
        api.addEventListener(t, (e) => window.__events.push({ type: t, detail: e.detail, at: Date.now() }));
      }
    });
  });

  let jobId;
  await step('the dashboard shows user001\'s new job within a second', async () => {
    jobId = await queueFromPage(user, slowBlur);
    const t0 = Date.now();
    const row = dash.locator(`#pane-queue tr[data-job="${jobId}"]`);
    await row.first().waitFor({ timeout: EVENT_MS }).catch(() => fail(`job ${jobId} not on the dashboard within ${EVENT_MS} ms`));
    summary.new_job_shown_ms = Date.now() - t0;
    log(`the new job showed after ${summary.new_job_shown_ms} ms`);
    if (!(await row.first().innerText()).includes('user001')) fail('the row does not name user001');
  });

  await step('the instructor cancels it and user001\'s page hears it', async () => {
    // Running by now (one GPU slot, nothing else queued): a stop reaches the page as
    // execution_interrupted; were it still waiting, the page's queue would drop to 0.
    await dash.locator(`#pane-queue tr[data-job="${jobId}"] button.cancel`).first().click();
    await user
      .waitForFunction(
        (id) => window.__events.some((e) => (e.type === 'execution_interrupted' && e.detail?.prompt_id === id)
          || (e.type === 'status' && e.detail?.exec_info?.queue_remaining === 0 && window.__events.some((x) => x.type === 'execution_start'))),
        jobId,
        { timeout: 10_000 },
      )
      .catch(() => fail('user001\'s page never heard the cancellation'));
    await dash.locator(`#pane-queue tr[data-job="${jobId}"]`).first().waitFor({ state: 'detached', timeout: 5_000 })
      .catch(() => fail('the cancelled job stayed on the dashboard'));
    summary.cancel_heard_as = await user.evaluate((id) => (window.__events.some((e) => e.type === 'execution_interrupted' && e.detail?.prompt_id === id) ? 'execution_interrupted' : 'status'), jobId);
  });

  await step('the instructor switches the policy and pauses; both show without a reload', async () => {
    await dash.locator('#policy').selectOption('fifo');
    await dash.waitForFunction(() => document.querySelector('#pane-queue h2:nth-of-type(2)')?.textContent.includes('fifo'), null, { timeout: 5_000 })
      .catch(() => fail('the new policy did not show'));
    await dash.locator('#pause').click();
    await dash.locator('#paused-note').waitFor({ timeout: 5_000 }).catch(() => fail('the pause did not show on the dashboard'));
    await dash.locator('#resume').waitFor({ timeout: 5_000 });
    await room.locator('.room-now .warn', { hasText: 'Paused' }).waitFor({ timeout: 5_000 }).catch(() => fail('the pause did not show on the room view'));
    if ((await dash.locator('#policy').inputValue()) !== 'fifo') fail('the policy select does not show fifo');
  });

  await step('a broadcast appears in user001\'s ComfyUI, as text, until cleared', async () => {
    const message = `5 minutes left ${HOSTILE}`;
    await dash.locator('#broadcast-text').fill(message);
    await dash.locator('#broadcast-send').click();
    const bar = user.locator('#comfyume-broadcast');
    await bar.waitFor({ timeout: 5_000 }).catch(() => fail('the broadcast never showed in user001\'s ComfyUI'));
    if (!(await bar.textContent()).includes(message)) fail(`the broadcast shows ${await bar.textContent()}`);
    if ((await user.locator('#comfyume-broadcast img').count()) > 0) fail('the broadcast was parsed as HTML');
    await dash.locator('#banner', { hasText: message }).waitFor({ timeout: 5_000 });
    await shot(user, 'user001-broadcast');
    await dash.locator('#broadcast-clear').click();
    await bar.waitFor({ state: 'detached', timeout: 5_000 }).catch(() => fail('the cleared broadcast stayed'));
  });

  let resultId;
  await step('resumed: user001\'s image and a hostile file name show among the results, as text', async () => {
    await dash.locator('#resume').click();
    await dash.locator('#pause').waitFor({ timeout: 5_000 });
    resultId = await queueFromPage(user, tiny('dash'));
    const hostileId = await queueFromPage(user, tiny(HOSTILE));
    await dash.locator('#tab-results').click();
    for (const id of [resultId, hostileId]) {
      await dash.locator(`#pane-results figure[data-job="${id}"] img`).first().waitFor({ timeout: 20_000 })
        .catch(() => fail(`result ${id} never showed`));
    }
    const caption = await dash.locator(`#pane-results figure[data-job="${hostileId}"] .fname`).first().textContent();
    if (!caption.includes(HOSTILE)) fail(`the hostile file name shows as ${JSON.stringify(caption)}`);
    if ((await dash.locator('#pane-results img[src="x"]').count()) > 0) fail('a file name became an <img>');
    // The <img> is in the page as soon as the result is; its bytes arrive a moment later
    // (on a loaded 2-core machine, more than a moment): wait for them, bounded.
    // Asked afresh on each poll: a live update may replace the element.
    await dash.waitForFunction((id) => {
      const img = document.querySelector(`#pane-results figure[data-job="${id}"] img`);
      return img && img.complete && img.naturalWidth > 0;
    }, resultId, { timeout: 10_000 })
      .catch(() => fail('the thumbnail did not load'));
    await dash.locator(`#pane-results figure[data-job="${resultId}"] .room-btn`).first().click();
    await room.locator('.room-main .pinned img').waitFor({ timeout: 5_000 }).catch(() => fail('the room view did not show the pinned result'));
    await shot(room, 'room-pinned');
  });

  await step('the zip of user001\'s work holds their outputs', async () => {
    const res = await dash.request.get(`${cfg.BASE_URL}/admin/api/users/user001/export.zip`);
    if (res.status() !== 200) fail(`export.zip: HTTP ${res.status()}`);
    const names = zipNames(await res.body());
    const outputs = names.filter((n) => n.startsWith('outputs/'));
    if (!outputs.some((n) => n.includes('dash'))) fail(`no dash_* output in the zip: ${names.join(', ')}`);
    summary.zip_entries = names.length;
  });

  await step('a busy workshop on the dashboard (screenshot)', async () => {
    // More participants, created from the dashboard's API, each queueing on their own
    // workspace (the instructor may act in any /userNNN/): the GPU works, the rest wait.
    const token = await dash.locator('meta[name=csrf-token]').getAttribute('content');
    const headers = { 'X-CSRF-Token': token };
    const names = ['user002', 'user003', 'user004', 'user005', 'user006'];
    for (const name of names) {
      const r = await dash.request.post(`${cfg.BASE_URL}/admin/api/users`, { headers, data: { name } });
      if (r.status() !== 201) fail(`creating ${name}: HTTP ${r.status()}`);
    }
    await queueFromPage(user, slowBlur);
    for (const [i, name] of names.entries()) {
      for (let k = 0; k < 2; k++) {
        const r = await dash.request.post(`${cfg.BASE_URL}/${name}/api/prompt`, {
          data: { client_id: `tab-${name}`, prompt: (i + k) % 2 ? slowBlur : tiny(`${name}-${k}`) },
        });
        if (r.status() !== 200) fail(`queueing for ${name}: HTTP ${r.status()}`);
      }
    }
    await queueFromPage(user, tiny('busy'));
    await dash.locator('#tab-queue').click();
    await dash.locator('#pane-queue table.waiting tbody tr').first().waitFor({ timeout: 5_000 });
    await dash.locator('#pane-queue .progress-cell .progress').first().waitFor({ timeout: 10_000 }).catch(() => {});
    await dash.waitForTimeout(1500);
    const file = await shot(dash, 'dashboard-busy');
    if (env.SCREENSHOT) {
      await dash.screenshot({ path: env.SCREENSHOT });
      log(`screenshot written to ${env.SCREENSHOT}`);
    }
    summary.screenshot = file;
    await dash.locator('#tab-participants').click();
    await dash.locator('#pane-participants tr[data-user="user006"]').waitFor({ timeout: 5_000 })
      .catch(() => fail('a participant created from the API is not in the list'));
    await shot(dash, 'participants');
    await dash.locator('#tab-gpus').click();
    await dash.locator('#pane-gpus svg.chart').waitFor({ timeout: 5_000 });
    await shot(dash, 'gpus');
    await dash.locator('#tab-system').click();
    await shot(dash, 'system');
    // Leave nothing running behind.
    await dash.request.post(`${cfg.BASE_URL}/admin/api/queue/cancel`, { headers });
  });

  await step('the audit log lists what the instructor did', async () => {
    await dash.locator('#tab-audit').click();
    for (const action of ['job.cancel', 'queue.policy', 'queue.pause', 'broadcast.set', 'broadcast.clear', 'queue.resume', 'room.show', 'export.participant']) {
      await dash.locator('#pane-audit td', { hasText: action }).first().waitFor({ timeout: 5_000 })
        .catch(() => fail(`${action} not in the audit log`));
    }
  });

  if (dialogs.length) fail(`a page opened dialogs by itself: ${dialogs.join('; ')}`);
});
