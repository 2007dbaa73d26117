// Browser story against a running `comfyume serve`: two participants log in to their own stock
// ComfyUI frontend, one saves a workflow through the UI, and the other must not see it.
//
//   BASE_URL=http://127.0.0.1:PORT USER1=user001 PASS1=... USER2=user002 PASS2=... \
//   OUT_DIR=/tmp/story node tests/browser/story.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), STORY_TIMEOUT_MS (per wait, default 60000),
// ALLOW_FAILED (comma-separated regular expressions for extra request URLs whose failure is
// harmless, matched against the full URL).
//
// Exit codes: 0 the story passed (a JSON summary is printed on stdout); 1 the story failed
// (a step, an uncaught page error, or a failed request; the reason is on stderr and screenshots
// are in OUT_DIR); 2 bad usage (missing environment variables).
//
// Fails on any uncaught page error and on any request that fails or answers >= 400, except the
// 404s that stock ComfyUI gives too (see HARMLESS_404), the 401 of the login page itself, and
// requests to non-loopback hosts (blocked here: there is no network).

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import path from 'node:path';

const env = process.env;
const missing = ['BASE_URL', 'USER1', 'PASS1', 'USER2', 'PASS2'].filter((k) => !env[k]);
if (missing.length) {
  console.error(`story: missing environment variables: ${missing.join(', ')}`);
  console.error('usage: BASE_URL=http://127.0.0.1:PORT USER1=.. PASS1=.. USER2=.. PASS2=.. [OUT_DIR=..] node story.mjs');
  process.exit(2);
}

const BASE_URL = env.BASE_URL.replace(/\/+$/, '');
const OUT_DIR = path.resolve(env.OUT_DIR || 'story-out');
const TIMEOUT = Number(env.STORY_TIMEOUT_MS || 60_000);
// The simulator's own node set is small (it defines what it can run); the frontend adds its own.
const MIN_NODE_TYPES = Number(env.MIN_NODE_TYPES || 30);
const CHROMIUM = env.CHROMIUM || '/usr/bin/chromium';
const WORKFLOW = `story-${randomBytes(4).toString('hex')}`;
const started = Date.now();
mkdirSync(OUT_DIR, { recursive: true });

// 404s that ComfyUI itself answers on every page load of a fresh user.
const HARMLESS_404 = [
  /\/user\.css$/, // both ./user.css and api/userdata/user.css
  /\/api\/userdata\/comfy\.templates\.json$/,
  /\/api\/userdata\?dir=subgraphs(&|$)/,
  /\/favicon\.ico$/,
  // Workflow bookmarks; read when the Workflows sidebar opens, absent until one is starred.
  /\/api\/userdata\/workflows%2F\.index\.json$/,
];
const EXTRA_ALLOWED = (env.ALLOW_FAILED || '')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean)
  .map((s) => new RegExp(s));

const problems = []; // uncaught page errors and failed requests, in order
const pending = new Set(); // request-failure checks still running
const consoleErrors = [];
const steps = [];
const shots = [];
const pages = new Map(); // label -> page, for failure screenshots
const state = { navigating: 0, closing: false, loggedIn: new Set(), tutorialPosted: new Set() };

function log(msg) {
  console.error(`[story +${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
}

function isLoopback(url) {
  let u;
  try {
    u = new URL(url);
  } catch {
    return true;
  }
  if (!/^(https?|wss?):$/.test(u.protocol)) return true; // data:, blob:, about:
  const h = u.hostname.replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

function allowedFailure(req, status, label) {
  const url = req.url();
  if (status === 404 && HARMLESS_404.some((re) => re.test(url))) return true;
  // The login page may be served with 401 to a browser that has no session yet.
  if (status === 401 && req.isNavigationRequest() && !state.loggedIn.has(label)) return true;
  return EXTRA_ALLOWED.some((re) => re.test(url));
}

class StoryError extends Error {}

function fail(msg) {
  throw new StoryError(msg);
}

async function checkProblems(where) {
  await Promise.all([...pending]);
  if (problems.length) fail(`${where}: ${problems.length} problem(s):\n  ${problems.join('\n  ')}`);
}

async function step(name, fn) {
  const t0 = Date.now();
  log(`step: ${name}`);
  const result = await fn();
  await checkProblems(name);
  steps.push({ name, ms: Date.now() - t0 });
  return result;
}

async function shot(page, name) {
  const file = path.join(OUT_DIR, `${String(shots.length + 1).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  shots.push(file);
}

function watch(context, label) {
  // No network here: refuse non-loopback requests at once instead of waiting for DNS.
  context.route((url) => !isLoopback(url.href), (route) => route.abort('blockedbyclient'));
  context.on('page', (page) => watchPage(page, label));
  context.on('request', (req) => {
    if (req.method() === 'POST' && /\/api\/settings\/Comfy\.TutorialCompleted$/.test(req.url())) {
      state.tutorialPosted.add(label);
    }
  });
  context.on('response', (res) => {
    const url = res.url();
    if (!isLoopback(url) || res.status() < 400) return;
    if (allowedFailure(res.request(), res.status(), label)) return;
    problems.push(`${label}: HTTP ${res.status()} ${res.request().method()} ${url}`);
  });
  context.on('requestfailed', (req) => {
    const url = req.url();
    const error = req.failure()?.errorText ?? 'failed';
    if (!isLoopback(url) || EXTRA_ALLOWED.some((re) => re.test(url))) return;
    // A reload or close cancels what is still in flight; that is not the server's fault.
    if (error.includes('ERR_ABORTED') && (state.navigating > 0 || state.closing)) return;
    const check = (async () => {
      // Chromium also reports ERR_ABORTED when the page drops a body it never reads (a
      // stylesheet that 404s, the empty 200 of POST /api/settings/...); the server did answer,
      // and its status was judged by the 'response' handler.
      if (error.includes('ERR_ABORTED') && (await req.response().catch(() => null))) return;
      problems.push(`${label}: request failed (${error}) ${req.method()} ${url}`);
    })();
    pending.add(check);
    check.finally(() => pending.delete(check));
  });
}

function watchPage(page, label) {
  page.on('pageerror', (err) => problems.push(`${label}: uncaught page error: ${err.stack || err}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push(`${label}: ${msg.text()}`);
  });
}

async function navigate(fn) {
  state.navigating += 1;
  try {
    return await fn();
  } finally {
    // Let cancelled requests report before failures count again.
    await new Promise((r) => setTimeout(r, 250));
    state.navigating -= 1;
  }
}

async function login(page, label, user, pass) {
  const home = `${BASE_URL}/${user}/`;
  await navigate(() => page.goto(home, { waitUntil: 'domcontentloaded', timeout: TIMEOUT }));
  const form = page.locator('form').filter({ has: page.locator('input[name=username]') });
  try {
    await form.waitFor({ state: 'visible', timeout: TIMEOUT });
  } catch {
    fail(`${label}: ${home} showed no login form (input[name=username]); page is ${page.url()}`);
  }
  const action = new URL((await form.getAttribute('action')) || page.url(), page.url());
  if (!action.pathname.endsWith('/login')) fail(`${label}: login form posts to ${action.pathname}, not /login`);
  const nextField = form.locator('input[name=next]');
  if ((await nextField.count()) === 0) fail(`${label}: login form has no hidden "next" field`);
  const next = await nextField.first().getAttribute('value');
  await shot(page, `${label}-login`);
  await form.locator('input[name=username]').fill(user);
  await form.locator('input[name=password]').fill(pass);
  await navigate(async () => {
    await Promise.all([
      page.waitForURL((u) => u.pathname.replace(/\/+$/, '') === `/${user}`, { timeout: TIMEOUT }),
      form.locator('button[type=submit]').click(),
    ]).catch(() => fail(`${label}: login did not land on /${user}/ (now at ${page.url()})`));
  });
  state.loggedIn.add(label);
  return { next };
}

/** Waits until the stock frontend is up: canvas visible, node definitions registered, and the
 * start-up workflow opened. */
async function waitForComfy(page, label) {
  await page.locator('canvas#graph-canvas').waitFor({ state: 'visible', timeout: TIMEOUT });
  try {
    await page.waitForFunction(
      (minTypes) =>
        !!window.app?.graph &&
        !!window.comfyAPI?.api?.api &&
        !!window.app.extensionManager?.workflow?.activeWorkflow &&
        Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > minTypes,
      MIN_NODE_TYPES,
      { timeout: TIMEOUT },
    );
  } catch {
    fail(`${label}: frontend never finished loading (no window.app graph, node types or open workflow)`);
  }
  // A user without Comfy.TutorialCompleted gets the Templates dialog: the frontend sets that
  // setting, opens a blank workflow, then fetches the templates and shows the dialog. Wait for
  // it and close it, so the canvas gets keyboard input.
  if (state.tutorialPosted.has(label)) {
    state.tutorialPosted.delete(label);
    await page
      .locator('.p-dialog:visible')
      .first()
      .waitFor({ state: 'visible', timeout: TIMEOUT })
      .catch(() => fail(`${label}: new-user Templates dialog never appeared`));
  }
  await closeDialogs(page, label);
  return page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types).length);
}

async function closeDialogs(page, label) {
  const deadline = Date.now() + 10_000;
  const open = page.locator('.p-dialog:visible');
  while ((await open.count()) > 0) {
    if (Date.now() > deadline) fail(`${label}: a dialog would not close`);
    // Escape only reaches a dialog that holds the focus; the close button always works.
    const close = open
      .last()
      .locator('.p-dialog-close-button, button[aria-label="Close"], button:has(> i.pi-times)');
    if ((await close.count()) > 0) await close.first().click({ timeout: 5_000 }).catch(() => {});
    else await page.keyboard.press('Escape');
    await page.waitForTimeout(300);
  }
}

async function nodeLibraryEntries(page, label) {
  await page.locator('.node-library-tab-button').first().click();
  const entries = page.locator('.node-lib-tree-explorer .p-tree-node');
  try {
    await entries.first().waitFor({ state: 'visible', timeout: TIMEOUT });
  } catch {
    fail(`${label}: node library sidebar shows no entries`);
  }
  const count = await entries.count();
  await shot(page, `${label}-node-library`);
  await page.locator('.node-library-tab-button').first().click(); // close it again
  return count;
}

/** The page's own API client lists the user's workflows (same request the sidebar makes). */
async function listWorkflows(page) {
  return page.evaluate(async () => {
    const res = await window.comfyAPI.api.api.fetchApi(
      '/userdata?dir=workflows&recurse=true&split=false&full_info=true',
    );
    if (res.status === 404) return []; // ComfyUI's answer for a user with no workflows folder
    if (!res.ok) throw new Error(`GET userdata?dir=workflows: HTTP ${res.status}`);
    return (await res.json()).map((e) => (typeof e === 'string' ? e : e.path));
  });
}

async function saveWithCtrlS(page, label, name) {
  // Focus the canvas (not a text field) so the keybinding reaches the frontend.
  const canvas = page.locator('canvas#graph-canvas');
  const box = await canvas.boundingBox();
  await page.mouse.click(box.x + box.width * 0.6, box.y + box.height * 0.8);
  await page.keyboard.press('Control+s');
  const input = page.locator('.p-dialog:visible input').first();
  try {
    await input.waitFor({ state: 'visible', timeout: TIMEOUT });
  } catch {
    fail(`${label}: Ctrl+S opened no "Save workflow" prompt`);
  }
  await input.fill(name);
  await shot(page, `${label}-save-prompt`);
  const encoded = encodeURIComponent(`workflows/${name}.json`);
  const saved = page.waitForResponse(
    (r) => r.request().method() === 'POST' && r.url().includes(`/api/userdata/${encoded}`),
    { timeout: TIMEOUT },
  );
  await input.press('Enter');
  const res = await saved.catch(() => fail(`${label}: no POST api/userdata/${encoded} after confirming`));
  if (!res.ok()) fail(`${label}: saving answered HTTP ${res.status()}`);
  return res.url();
}

async function sidebarShows(page, label, name) {
  await page.locator('.workflows-tab-button').first().click();
  const tab = page.locator('.workflows-sidebar-tab');
  await tab.waitFor({ state: 'visible', timeout: TIMEOUT });
  // The Browse list shows the file name, with or without ".json".
  const item = tab.getByText(new RegExp(`^\\s*${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}(\\.json)?\\s*$`));
  // The list is fetched on open; give it time to arrive before judging absence.
  await page.waitForLoadState('networkidle', { timeout: 15_000 }).catch(() => {});
  const visible = await item.first().isVisible().catch(() => false);
  await shot(page, `${label}-workflows-sidebar`);
  return visible;
}

async function main() {
  log(`launching ${CHROMIUM}; screenshots in ${OUT_DIR}; workflow name ${WORKFLOW}`);
  // launch() gives the browser a fresh temporary profile of its own and deletes it on close.
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: TIMEOUT,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-quic',
    ],
  });
  const summary = { base_url: BASE_URL, workflow: `workflows/${WORKFLOW}.json`, user1: {}, user2: {} };
  try {
    summary.browser = browser.version();
    // --- user 1 -------------------------------------------------------------
    const ctx1 = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    watch(ctx1, 'user1');
    const p1 = await ctx1.newPage();
    pages.set('user1', p1);
    const login1 = await step('user1 logs in', () => login(p1, 'user1', env.USER1, env.PASS1));
    summary.user1.login_next_field = login1.next;
    summary.user1.node_types = await step('user1 frontend loads', () => waitForComfy(p1, 'user1'));
    await shot(p1, 'user1-ready');
    summary.user1.node_library_entries = await step('user1 node library', () =>
      nodeLibraryEntries(p1, 'user1'),
    );
    const before = await listWorkflows(p1);
    if (before.includes(`${WORKFLOW}.json`)) fail(`user1 already has ${WORKFLOW}.json`);
    summary.user1.save_request = await step('user1 saves a workflow with Ctrl+S', () =>
      saveWithCtrlS(p1, 'user1', WORKFLOW),
    );
    await shot(p1, 'user1-saved');
    await step('user1 reloads and finds it', async () => {
      await navigate(() => p1.reload({ waitUntil: 'domcontentloaded', timeout: TIMEOUT }));
      await waitForComfy(p1, 'user1');
      const after = await listWorkflows(p1);
      if (!after.includes(`${WORKFLOW}.json`)) fail(`user1's workflows after reload lack ${WORKFLOW}.json: ${JSON.stringify(after)}`);
      if (!(await sidebarShows(p1, 'user1', WORKFLOW))) fail(`user1's workflows sidebar does not show ${WORKFLOW}`);
      summary.user1.workflows = after;
    });

    // --- user 2, fresh context ------------------------------------------------
    const ctx2 = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    watch(ctx2, 'user2');
    const p2 = await ctx2.newPage();
    pages.set('user2', p2);
    await step('user2 logs in', () => login(p2, 'user2', env.USER2, env.PASS2));
    summary.user2.node_types = await step('user2 frontend loads', () => waitForComfy(p2, 'user2'));
    await step('user2 does not see it', async () => {
      const theirs = await listWorkflows(p2);
      if (theirs.includes(`${WORKFLOW}.json`)) fail(`user2 lists user1's ${WORKFLOW}.json`);
      if (await sidebarShows(p2, 'user2', WORKFLOW)) fail(`user2's workflows sidebar shows user1's ${WORKFLOW}`);
      // Asking for user1's file by its URL, with user2's session, must not return it.
      const url = `${BASE_URL}/${env.USER1}/api/userdata/${encodeURIComponent(`workflows/${WORKFLOW}.json`)}`;
      const res = await ctx2.request.get(url, { maxRedirects: 0, failOnStatusCode: false });
      const body = await res.text();
      if (res.status() < 300 && body.includes('"nodes"')) fail(`user2 read user1's workflow at ${url} (HTTP ${res.status()})`);
      summary.user2.workflows = theirs;
      summary.user2.cross_user_read_status = res.status();
    });
  } catch (err) {
    for (const [label, page] of pages) {
      if (!page.isClosed()) await shot(page, `${label}-failure`).catch(() => {});
    }
    throw err;
  } finally {
    state.closing = true;
    await browser.close().catch(() => {});
  }
  await checkProblems('end of story');
  summary.ok = true;
  summary.steps = steps;
  summary.total_ms = Date.now() - started;
  summary.console_errors = consoleErrors;
  summary.screenshots = shots;
  console.log(JSON.stringify(summary, null, 2));
}

const hardStop = setTimeout(() => {
  console.error(`story: FAILED: gave up after ${(10 * TIMEOUT) / 1000}s`);
  process.exit(1);
}, 10 * TIMEOUT);
hardStop.unref();

main().then(
  () => process.exit(0),
  (err) => {
    const msg = err instanceof StoryError ? err.message : err?.stack || String(err);
    console.error(`story: FAILED: ${msg}`);
    const unreported = problems.filter((p) => !msg.includes(p));
    if (unreported.length) console.error(`also:\n  ${unreported.join('\n  ')}`);
    if (consoleErrors.length) console.error(`console errors:\n  ${consoleErrors.slice(0, 20).join('\n  ')}`);
    console.error(`steps done: ${steps.map((s) => s.name).join(' | ') || 'none'}; screenshots in ${OUT_DIR}`);
    process.exit(1);
  },
);
