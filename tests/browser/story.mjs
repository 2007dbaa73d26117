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
// 404s that stock ComfyUI gives too, the 401 of the login page itself, and requests to
// non-loopback hosts (see lib.mjs, which holds the harness shared with run.mjs).

import { randomBytes } from 'node:crypto';
import {
  cfg,
  fail,
  listWorkflows,
  log,
  login,
  navigate,
  newParticipant,
  openWorkflowsSidebar,
  runStory,
  setup,
  shot,
  step,
  waitForComfy,
} from './lib.mjs';

const env = process.env;
setup(
  'story',
  ['BASE_URL', 'USER1', 'PASS1', 'USER2', 'PASS2'],
  'BASE_URL=http://127.0.0.1:PORT USER1=.. PASS1=.. USER2=.. PASS2=.. [OUT_DIR=..] node story.mjs',
);
const WORKFLOW = `story-${randomBytes(4).toString('hex')}`;

async function nodeLibraryEntries(page, label) {
  await page.locator('.node-library-tab-button').first().click();
  const entries = page.locator('.node-lib-tree-explorer .p-tree-node');
  try {
    await entries.first().waitFor({ state: 'visible', timeout: cfg.TIMEOUT });
  } catch {
    fail(`${label}: node library sidebar shows no entries`);
  }
  const count = await entries.count();
  await shot(page, `${label}-node-library`);
  await page.locator('.node-library-tab-button').first().click(); // close it again
  return count;
}

async function saveWithCtrlS(page, label, name) {
  // Focus the canvas (not a text field) so the keybinding reaches the frontend.
  const canvas = page.locator('canvas#graph-canvas');
  const box = await canvas.boundingBox();
  await page.mouse.click(box.x + box.width * 0.6, box.y + box.height * 0.8);
  await page.keyboard.press('Control+s');
  const input = page.locator('.p-dialog:visible input').first();
  try {
    await input.waitFor({ state: 'visible', timeout: cfg.TIMEOUT });
  } catch {
    fail(`${label}: Ctrl+S opened no "Save workflow" prompt`);
  }
  await input.fill(name);
  await shot(page, `${label}-save-prompt`);
  const encoded = encodeURIComponent(`workflows/${name}.json`);
  const saved = page.waitForResponse(
    (r) => r.request().method() === 'POST' && r.url().includes(`/api/userdata/${encoded}`),
    { timeout: cfg.TIMEOUT },
  );
  await input.press('Enter');
  const res = await saved.catch(() => fail(`${label}: no POST api/userdata/${encoded} after confirming`));
  if (!res.ok()) fail(`${label}: saving answered HTTP ${res.status()}`);
  return res.url();
}

async function sidebarShows(page, label, name) {
  const tab = await openWorkflowsSidebar(page);
  // The Browse list shows the file name, with or without ".json".
  const item = tab.getByText(new RegExp(`^\\s*${name.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}(\\.json)?\\s*$`));
  // The list is fetched on open; give it time to arrive before judging absence.
  await page.waitForLoadState('networkidle', { timeout: 15_000 }).catch(() => {});
  const visible = await item.first().isVisible().catch(() => false);
  await shot(page, `${label}-workflows-sidebar`);
  return visible;
}

runStory(async (browser, summary) => {
  log(`workflow name ${WORKFLOW}`);
  Object.assign(summary, { workflow: `workflows/${WORKFLOW}.json`, user1: {}, user2: {} });
  // --- user 1 -------------------------------------------------------------
  const { page: p1 } = await newParticipant(browser, 'user1');
  const login1 = await step('user1 logs in', () => login(p1, 'user1', env.USER1, env.PASS1));
  summary.user1.login_next_field = login1.next;
  summary.user1.node_types = (await step('user1 frontend loads', () => waitForComfy(p1, 'user1'))).nodeTypes;
  await shot(p1, 'user1-ready');
  summary.user1.node_library_entries = await step('user1 node library', () => nodeLibraryEntries(p1, 'user1'));
  const before = await listWorkflows(p1);
  if (before.includes(`${WORKFLOW}.json`)) fail(`user1 already has ${WORKFLOW}.json`);
  summary.user1.save_request = await step('user1 saves a workflow with Ctrl+S', () =>
    saveWithCtrlS(p1, 'user1', WORKFLOW),
  );
  await shot(p1, 'user1-saved');
  await step('user1 reloads and finds it', async () => {
    await navigate(() => p1.reload({ waitUntil: 'domcontentloaded', timeout: cfg.TIMEOUT }));
    await waitForComfy(p1, 'user1');
    const after = await listWorkflows(p1);
    if (!after.includes(`${WORKFLOW}.json`)) fail(`user1's workflows after reload lack ${WORKFLOW}.json: ${JSON.stringify(after)}`);
    if (!(await sidebarShows(p1, 'user1', WORKFLOW))) fail(`user1's workflows sidebar does not show ${WORKFLOW}`);
    summary.user1.workflows = after;
  });

  // --- user 2, fresh context ------------------------------------------------
  const { context: ctx2, page: p2 } = await newParticipant(browser, 'user2');
  await step('user2 logs in', () => login(p2, 'user2', env.USER2, env.PASS2));
  summary.user2.node_types = (await step('user2 frontend loads', () => waitForComfy(p2, 'user2'))).nodeTypes;
  await step('user2 does not see it', async () => {
    const theirs = await listWorkflows(p2);
    if (theirs.includes(`${WORKFLOW}.json`)) fail(`user2 lists user1's ${WORKFLOW}.json`);
    if (await sidebarShows(p2, 'user2', WORKFLOW)) fail(`user2's workflows sidebar shows user1's ${WORKFLOW}`);
    // Asking for user1's file by its URL, with user2's session, must not return it.
    const url = `${cfg.BASE_URL}/${env.USER1}/api/userdata/${encodeURIComponent(`workflows/${WORKFLOW}.json`)}`;
    const res = await ctx2.request.get(url, { maxRedirects: 0, failOnStatusCode: false });
    const body = await res.text();
    if (res.status() < 300 && body.includes('"nodes"')) fail(`user2 read user1's workflow at ${url} (HTTP ${res.status()})`);
    summary.user2.workflows = theirs;
    summary.user2.cross_user_read_status = res.status();
  });
});
