import { chromium } from 'playwright-core';
import { readFileSync, readdirSync } from 'node:fs';
const dir = '/work/main/crates/templates/workflows';
const b = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox','--disable-gpu','--disable-background-networking'] });
const c = await b.newContext({ viewport: { width: 1440, height: 900 } });
const p = await c.newPage();
const errors = [];
p.on('pageerror', e => errors.push(String(e)));
p.on('console', m => { if (m.type() === 'error' || m.type() === 'warning') errors.push(m.type() + ': ' + m.text()); });
await p.goto('http://127.0.0.1:18732/user001/');
await p.fill('input[name=username]', 'user001'); await p.fill('input[name=password]', 'pw1');
await p.click('button[type=submit]');
await p.waitForFunction(() => window.app?.graph && window.app.extensionManager?.workflow?.activeWorkflow && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100);
await p.waitForTimeout(2000);
for (let i = 0; i < 5 && await p.locator('.p-dialog:visible').count(); i++) { await p.locator('.p-dialog:visible button:has(> i.pi-times)').first().click().catch(() => {}); await p.waitForTimeout(400); }
for (const f of readdirSync(dir)) {
  errors.length = 0;
  const wf = JSON.parse(readFileSync(`${dir}/${f}`, 'utf8'));
  const r = await p.evaluate(async ([wf, name]) => {
    await window.app.loadGraphData(structuredClone(wf), true, true, name);
    const g = window.app.graph;
    const missing = g.nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
    const ser = g.serialize();
    const diffs = [];
    for (const n of wf.nodes) {
      const s = ser.nodes.find(x => x.id === n.id);
      if (JSON.stringify(s.widgets_values ?? []) !== JSON.stringify(n.widgets_values ?? [])) diffs.push(`${n.id} ${n.type}: file ${JSON.stringify(n.widgets_values)} -> frontend ${JSON.stringify(s.widgets_values)}`);
    }
    const links = ser.links.length;
    const prompt = await window.app.graphToPrompt();
    return { nodes: g.nodes.length, links, missing, diffs, output: prompt.output };
  }, [wf, f.replace(/\.json$/, '')]);
  await p.locator('canvas#graph-canvas').click({ position: { x: 700, y: 990 } }).catch(() => {});
  await p.waitForTimeout(500);
  await p.screenshot({ path: `/tmp/tpl-${f.replace(/[^A-Za-z0-9]+/g, '_')}.png` });
  console.log(`== ${f}: nodes ${r.nodes} links ${r.links} missing ${JSON.stringify(r.missing)} diffs ${r.diffs.length}`);
  for (const d of r.diffs) console.log('   diff', d);
  for (const e of errors) console.log('   err', e.slice(0, 300));
  if (f.startsWith('LTX-2 - text to video.json') || f.startsWith('Flux.2 Klein 9B')) console.log(JSON.stringify(r.output));
}
await b.close();
