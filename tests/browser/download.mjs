// "Download my work" in Chromium, timed: the participant signs in through the login page,
// the frontend loads, and each round clicks the menu entry and waits until the browser has
// the whole zip on disk (then `sync`, as the other sides of `comfyume-bench export` do).
// Prints one line per round: `download ms=<ms> bytes=<n>`.
import { execSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { cfg, fail, log, login, newParticipant, runStory, setup, waitForComfy } from './lib.mjs';

setup('download', ['BASE_URL', 'USER1', 'PASS1'], 'BASE_URL=.. USER1=.. PASS1=.. [ROUNDS=1] node download.mjs');
const ROUNDS = Number(process.env.ROUNDS || 1);

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
    const d = await started.catch(() => fail('"Download my work" started no download'));
    const file = await d.path();
    execSync('sync');
    const ms = performance.now() - t0;
    const bytes = statSync(file).size;
    console.log(`download ms=${ms.toFixed(1)} bytes=${bytes}`);
    summary.rounds.push({ ms, bytes });
    await d.delete();
  }
});
