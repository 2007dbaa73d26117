// "Download my work" in Chromium, timed: the participant signs in through the login page,
// the frontend loads, and each round clicks the menu entry and waits until the browser has
// the whole zip on disk (then `sync`, as the other sides of `comfyume-bench export` do).
// Prints one line per round: `download ms=<ms> bytes=<n>`. With STATIC_URL (a file of the
// same size from another server, nginx in docs/PERFORMANCE.md section 11), each round then
// saves that file the same way, by a link clicked in a second tab: `static ms=<ms> bytes=<n>`,
// the browser's own ceiling in the same run.
import { execSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { cfg, fail, log, login, newParticipant, runStory, setup, waitForComfy } from './lib.mjs';

setup('download', ['BASE_URL', 'USER1', 'PASS1'], 'BASE_URL=.. USER1=.. PASS1=.. [ROUNDS=1] node download.mjs');
const ROUNDS = Number(process.env.ROUNDS || 1);
const STATIC_URL = process.env.STATIC_URL;

// Waits until the browser has the whole download on disk, then `sync`; its time from `t0`.
async function saved(started, t0, what) {
  const d = await started.catch(() => fail(`${what} started no download`));
  const file = await d.path();
  execSync('sync');
  const ms = performance.now() - t0;
  const bytes = statSync(file).size;
  await d.delete();
  return { ms, bytes };
}

runStory(async (browser, summary) => {
  const { page } = await newParticipant(browser, 'user1');
  await login(page, 'user1', process.env.USER1, process.env.PASS1);
  await waitForComfy(page, 'user1');
  summary.rounds = [];
  for (let i = 0; i < ROUNDS; i++) {
    await page.locator('.comfyui-logo-wrapper, .comfy-menu-button-wrapper, [data-testid="comfy-menu-button"]').first().click();
    await page.locator('.p-tieredmenu-item', { hasText: 'Workflow' }).first().hover();
    const item = page.getByRole('menuitem', { name: 'Download my work' });
    await item.waitFor({ state: 'visible', timeout: cfg.TIMEOUT }).catch(() => fail('the Workflow menu has no "Download my work"'));
    execSync('sync');
    const t0 = performance.now();
    const started = page.waitForEvent('download', { timeout: cfg.TIMEOUT });
    await item.click();
    const zip = await saved(started, t0, '"Download my work"');
    console.log(`download ms=${zip.ms.toFixed(1)} bytes=${zip.bytes}`);
    summary.rounds.push(zip);
    if (STATIC_URL) {
      const other = await page.context().newPage();
      await other.goto('about:blank');
      execSync('sync');
      const t1 = performance.now();
      const got = other.waitForEvent('download', { timeout: cfg.TIMEOUT });
      await other.evaluate((url) => {
        const a = document.createElement('a');
        a.href = url;
        a.download = '';
        document.body.appendChild(a);
        a.click();
      }, STATIC_URL);
      const file = await saved(got, t1, STATIC_URL);
      console.log(`static ms=${file.ms.toFixed(1)} bytes=${file.bytes}`);
      await other.close();
    }
  }
});
