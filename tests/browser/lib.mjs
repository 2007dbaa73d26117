// Shared harness of the browser stories (story.mjs, run.mjs) against a running `comfyume serve`:
// environment, Chromium launch, the watch for page errors and failed requests, steps with
// screenshots, and the participant's moves every story makes (log in, wait for the stock
// frontend, close its dialogs, open the Workflows sidebar).
//
// Environment read here: BASE_URL, OUT_DIR, CHROMIUM (default /usr/bin/chromium),
// STORY_TIMEOUT_MS (per wait, default 60000), MIN_NODE_TYPES, ALLOW_FAILED (comma-separated
// regular expressions for extra request URLs whose failure is harmless, matched against the
// full URL).
//
// A story fails on any uncaught page error and on any request that fails or answers >= 400,
// except the 404s that stock ComfyUI gives too (see HARMLESS_404), the 401 of the login page
// itself, and requests to non-loopback hosts (blocked here: there is no network).
//
// Exit codes of a story: 0 passed (a JSON summary on stdout); 1 failed (the reason on stderr,
// screenshots in OUT_DIR); 2 bad usage (missing environment variables).

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import path from 'node:path';

const env = process.env;

/** Filled by setup(); read by everything below. */
export const cfg = {};

export const problems = []; // uncaught page errors and failed requests, in order
const pending = new Set(); // request-failure checks still running
export const consoleErrors = [];
export const steps = [];
export const shots = [];
export const pages = new Map(); // label -> page, for failure screenshots
export const state = { navigating: 0, closing: false, loggedIn: new Set(), tutorialPosted: new Set() };

// 404s that ComfyUI itself answers on every page load of a fresh user.
const HARMLESS_404 = [
  /\/user\.css$/, // both ./user.css and api/userdata/user.css
  /\/api\/userdata\/comfy\.templates\.json$/,
  /\/api\/userdata\?dir=subgraphs(&|$)/,
  /\/favicon\.ico$/,
  // Workflow bookmarks; read when the Workflows sidebar opens, absent until one is starred.
  /\/api\/userdata\/workflows%2F\.index\.json$/,
];
let extraAllowed = [];

/** Checks the environment (exit 2 with `usage` when a variable in `required` is missing) and
 * fills cfg. `name` prefixes the log lines. */
export function setup(name, required, usage) {
  const missing = required.filter((k) => !env[k]);
  if (missing.length) {
    console.error(`${name}: missing environment variables: ${missing.join(', ')}`);
    console.error(`usage: ${usage}`);
    process.exit(2);
  }
  Object.assign(cfg, {
    name,
    BASE_URL: env.BASE_URL.replace(/\/+$/, ''),
    OUT_DIR: path.resolve(env.OUT_DIR || `${name}-out`),
    TIMEOUT: Number(env.STORY_TIMEOUT_MS || 60_000),
    // The simulator's own node set is small (it defines what it can run); the frontend adds its own.
    MIN_NODE_TYPES: Number(env.MIN_NODE_TYPES || 30),
    CHROMIUM: env.CHROMIUM || '/usr/bin/chromium',
    started: Date.now(),
  });
  extraAllowed = (env.ALLOW_FAILED || '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => new RegExp(s));
  mkdirSync(cfg.OUT_DIR, { recursive: true });
  return cfg;
}

export function log(msg) {
  console.error(`[${cfg.name} +${((Date.now() - cfg.started) / 1000).toFixed(1)}s] ${msg}`);
}

export function isLoopback(url) {
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
  return extraAllowed.some((re) => re.test(url));
}

export class StoryError extends Error {}

export function fail(msg) {
  throw new StoryError(msg);
}

export async function checkProblems(where) {
  await Promise.all([...pending]);
  if (problems.length) fail(`${where}: ${problems.length} problem(s):\n  ${problems.join('\n  ')}`);
}

export async function step(name, fn) {
  const t0 = Date.now();
  log(`step: ${name}`);
  const result = await fn();
  await checkProblems(name);
  steps.push({ name, ms: Date.now() - t0 });
  return result;
}

export async function shot(page, name) {
  const file = path.join(cfg.OUT_DIR, `${String(shots.length + 1).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  shots.push(file);
  return file;
}

export function watch(context, label) {
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
    if (!isLoopback(url) || extraAllowed.some((re) => re.test(url))) return;
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

/** A fresh context (own cookies) for one participant, watched, with its first page. */
export async function newParticipant(browser, label) {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  watch(context, label);
  const page = await context.newPage();
  pages.set(label, page);
  return { context, page };
}

export async function navigate(fn) {
  state.navigating += 1;
  try {
    return await fn();
  } finally {
    // Let cancelled requests report before failures count again.
    await new Promise((r) => setTimeout(r, 250));
    state.navigating -= 1;
  }
}

export async function login(page, label, user, pass) {
  const home = `${cfg.BASE_URL}/${user}/`;
  const { TIMEOUT } = cfg;
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
 * start-up workflow opened; then closes what dialogs it shows. Returns the number of node types
 * and the dialogs closed (their aria-labelledby, e.g. "global-workflow-template-selector"). */
export async function waitForComfy(page, label) {
  const { TIMEOUT } = cfg;
  await page.locator('canvas#graph-canvas').waitFor({ state: 'visible', timeout: TIMEOUT });
  try {
    await page.waitForFunction(
      (minTypes) =>
        !!window.app?.graph &&
        !!window.comfyAPI?.api?.api &&
        !!window.app.extensionManager?.workflow?.activeWorkflow &&
        Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > minTypes,
      cfg.MIN_NODE_TYPES,
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
  const closedDialogs = await closeDialogs(page, label);
  const nodeTypes = await page.evaluate(() => Object.keys(window.LiteGraph.registered_node_types).length);
  return { nodeTypes, closedDialogs };
}

/** Closes every visible dialog; returns what each was (aria-labelledby, else its first text). */
export async function closeDialogs(page, label) {
  const deadline = Date.now() + 10_000;
  const open = page.locator('.p-dialog:visible');
  const closed = [];
  while ((await open.count()) > 0) {
    if (Date.now() > deadline) fail(`${label}: a dialog would not close`);
    const dialog = open.last();
    const what =
      (await dialog.getAttribute('aria-labelledby').catch(() => null)) ||
      ((await dialog.innerText().catch(() => '')) || '').trim().slice(0, 60);
    if (closed.at(-1) !== what) closed.push(what);
    // Escape only reaches a dialog that holds the focus; the close button always works.
    const close = dialog.locator('.p-dialog-close-button, button[aria-label="Close"], button:has(> i.pi-times)');
    if ((await close.count()) > 0) await close.first().click({ timeout: 5_000 }).catch(() => {});
    else await page.keyboard.press('Escape');
    await page.waitForTimeout(300);
  }
  return closed;
}

/** The page's own API client lists the user's workflows (same request the sidebar makes). */
export async function listWorkflows(page) {
  return page.evaluate(async () => {
    const res = await window.comfyAPI.api.api.fetchApi(
      '/userdata?dir=workflows&recurse=true&split=false&full_info=true',
    );
    if (res.status === 404) return []; // ComfyUI's answer for a user with no workflows folder
    if (!res.ok) throw new Error(`GET userdata?dir=workflows: HTTP ${res.status}`);
    return (await res.json()).map((e) => (typeof e === 'string' ? e : e.path));
  });
}

/** Opens the Workflows sidebar tab (unless it is open) and returns its locator. */
export async function openWorkflowsSidebar(page) {
  const tab = page.locator('.workflows-sidebar-tab');
  if (!(await tab.isVisible().catch(() => false))) await page.locator('.workflows-tab-button').first().click();
  await tab.waitFor({ state: 'visible', timeout: cfg.TIMEOUT });
  return tab;
}

/** Launches Chromium, runs `body(browser, summary)`, prints the summary as JSON and exits 0; on
 * a failure, takes a screenshot of every page and exits 1 with the reason on stderr. */
export function runStory(body) {
  const { TIMEOUT } = cfg;
  const hardStop = setTimeout(() => {
    console.error(`${cfg.name}: FAILED: gave up after ${(10 * TIMEOUT) / 1000}s`);
    process.exit(1);
  }, 10 * TIMEOUT);
  hardStop.unref();

  const main = async () => {
    log(`launching ${cfg.CHROMIUM}; screenshots in ${cfg.OUT_DIR}`);
    // launch() gives the browser a fresh temporary profile of its own and deletes it on close.
    const browser = await chromium.launch({
      executablePath: cfg.CHROMIUM,
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
    const summary = { base_url: cfg.BASE_URL, browser: browser.version() };
    try {
      await body(browser, summary);
    } catch (err) {
      for (const [label, page] of pages) {
        if (!page.isClosed()) await shot(page, `${label}-failure`).catch(() => {});
      }
      throw err;
    } finally {
      state.closing = true;
      await browser.close().catch(() => {});
    }
    await checkProblems(`end of ${cfg.name}`);
    summary.ok = true;
    summary.steps = steps;
    summary.total_ms = Date.now() - cfg.started;
    summary.console_errors = consoleErrors;
    summary.screenshots = shots;
    console.log(JSON.stringify(summary, null, 2));
  };

  main().then(
    () => process.exit(0),
    (err) => {
      const msg = err instanceof StoryError ? err.message : err?.stack || String(err);
      console.error(`${cfg.name}: FAILED: ${msg}`);
      const unreported = problems.filter((p) => !msg.includes(p));
      if (unreported.length) console.error(`also:\n  ${unreported.join('\n  ')}`);
      if (consoleErrors.length) console.error(`console errors:\n  ${consoleErrors.slice(0, 20).join('\n  ')}`);
      console.error(`steps done: ${steps.map((s) => s.name).join(' | ') || 'none'}; screenshots in ${cfg.OUT_DIR}`);
      process.exit(1);
    },
  );
}

/** The entries of a zip archive, read through its central directory: [{name, method, crc,
 * size, data}] with each stored or deflated entry's bytes (inflated) in `data`. */
export async function unzip(buf) {
  const { inflateRawSync, crc32 } = await import('node:zlib');
  const end = buf.length - 22;
  if (buf.readUInt32LE(end) !== 0x06054b50) fail('not a zip: no end of central directory record');
  const n = buf.readUInt16LE(end + 10);
  let at = buf.readUInt32LE(end + 16);
  const out = [];
  for (let i = 0; i < n; i += 1) {
    if (buf.readUInt32LE(at) !== 0x02014b50) fail(`zip: bad central directory entry ${i}`);
    const method = buf.readUInt16LE(at + 10);
    const crc = buf.readUInt32LE(at + 16);
    const csize = buf.readUInt32LE(at + 20);
    const size = buf.readUInt32LE(at + 24);
    const nl = buf.readUInt16LE(at + 28);
    const xl = buf.readUInt16LE(at + 30);
    const cl = buf.readUInt16LE(at + 32);
    const local = buf.readUInt32LE(at + 42);
    const name = buf.toString('utf8', at + 46, at + 46 + nl);
    const dataAt = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
    const raw = buf.subarray(dataAt, dataAt + csize);
    const data = method === 8 ? inflateRawSync(raw) : Buffer.from(raw);
    if (data.length !== size) fail(`zip: ${name} is ${data.length} bytes, the directory says ${size}`);
    if (crc32 && crc32(data) >>> 0 !== crc) fail(`zip: CRC of ${name} does not match`);
    out.push({ name, method, crc, size, data });
    at += 46 + nl + xl + cl;
  }
  return out;
}
