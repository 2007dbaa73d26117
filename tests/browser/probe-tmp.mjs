import { chromium } from 'playwright-core';
const BASE = process.env.BASE_URL, U = process.env.U, S = '/tmp/runprobe.iSSN/shots/';
const b = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless','--no-sandbox','--disable-gpu'] });
const ctx = await b.newContext({ viewport: { width: 1440, height: 900 } });
await ctx.route((u) => !/127\.0\.0\.1/.test(u.href), (r) => r.abort('blockedbyclient'));
const p = await ctx.newPage();
p.on('pageerror', e => console.log('PAGEERROR', e));
ctx.on('response', r => { if (r.status() >= 400) console.log('HTTP', r.status(), r.url()); });
ctx.on('request', r => { if (!/\.(js|css|woff2?|svg|png|json)$/.test(new URL(r.url()).pathname) || r.method()!=='GET') console.log('REQ', r.method(), r.url()); });
await p.goto(`${BASE}/${U}/`);
await p.fill('input[name=username]', U);
await p.fill('input[name=password]', 'secret');
await p.click('button[type=submit]');
await p.waitForFunction(() => !!window.app?.extensionManager?.workflow?.activeWorkflow && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 30, null, {timeout: 60000});
await p.locator('.p-dialog:visible').first().waitFor({timeout: 30000}).catch(()=>console.log('no dialog'));
const open = p.locator('.p-dialog:visible');
while (await open.count() > 0) {
  const close = open.last().locator('.p-dialog-close-button, button[aria-label="Close"], button:has(> i.pi-times)');
  if (await close.count()) await close.first().click(); else await p.keyboard.press('Escape');
  await p.waitForTimeout(300);
}
console.log('--- opening sidebar');
await p.locator('.workflows-tab-button').first().click();
const tab = p.locator('.workflows-sidebar-tab');
await tab.waitFor();
await p.waitForTimeout(1500);
await p.screenshot({ path: S + 'b1.png' });

const entry = tab.locator('.comfyui-workflows-browse li.p-tree-node[aria-label="Flux.2 Klein 9B - text to image.json"]');
await entry.click();
await p.waitForFunction(() => window.app.extensionManager.workflow.activeWorkflow?.path === 'workflows/Flux.2 Klein 9B - text to image.json', null, {timeout: 10000});
await p.waitForTimeout(1000);
console.log('dialogs', await p.locator('.p-dialog:visible').count());
await p.screenshot({ path: S + 'b2.png' });
await p.evaluate(() => {
  window.__ev = [];
  const api = window.comfyAPI.api.api;
  for (const t of ['execution_start','execution_cached','executing','progress','progress_state','executed','execution_success','execution_error','execution_interrupted','status','b_preview','b_preview_with_metadata'])
    api.addEventListener(t, (e) => window.__ev.push({t, at: performance.now(), d: e.detail instanceof Blob ? 'blob' : e.detail}));
});
await p.evaluate(() => {
  window.__texts = [];
  const seen = new Set();
  const mo = new MutationObserver(() => {
    for (const el of document.querySelectorAll('body *')) {
      if (el.children.length === 0) { const t = el.textContent.trim(); if (/running|node|%/i.test(t) && t.length < 80 && !seen.has(t)) { seen.add(t); window.__texts.push([performance.now(), t, el.className.slice(0,60), el.parentElement?.className.slice(0,60)]); } }
    }
  });
  mo.observe(document.body, { subtree: true, childList: true, characterData: true });
});
const t0 = Date.now();
await p.locator('button[aria-label="Run"], .p-splitbutton-button:has-text("Run")').first().click();
await p.waitForTimeout(600);
await p.screenshot({ path: S + 'b3.png' });
console.log('OVERLAY', await p.evaluate(() => { const el = [...document.querySelectorAll('*')].find(e => e.children.length === 0 && e.textContent.trim() === 'Current node:'); let x = el; for (let i = 0; i < 6 && x; i++) x = x.parentElement; return x?.outerHTML; }));
await p.waitForFunction(() => window.__ev.some(e => e.t === 'execution_success'), null, {timeout: 30000}).catch(e => console.log('no success', e.message));
console.log('took', Date.now() - t0);
await p.waitForTimeout(1500);
await p.screenshot({ path: S + 'b4.png' });
console.log(JSON.stringify(await p.evaluate(() => window.__ev.map(e => e.t === 'progress_state' ? {t: e.t, at: e.at, n: Object.keys(e.d.nodes||{}).length} : e)), null, 0));
console.log(await p.evaluate(() => { const n = window.app.graph.getNodeById(15); return { imgs: n.imgs?.map(i => [i.src, i.complete, i.naturalWidth]), out: window.app.nodeOutputs?.['15'] }; }));
console.log(JSON.stringify(await p.evaluate(() => window.__texts),null,0));
console.log(JSON.stringify(await p.evaluate(() => window.__ev.filter(e => /executed|success|execution_start/.test(e.t)))));
await p.locator('.assets-tab-button').first().click();
await p.waitForTimeout(2000);
await p.screenshot({ path: S + 'b5.png' });
console.log(await p.evaluate(() => [...document.querySelectorAll('img')].map(i => [i.src, i.naturalWidth, i.className.slice(0,80), i.closest('[class*=side-bar], [class*=sidebar]')?.className?.slice(0,80)])));
await b.close();
