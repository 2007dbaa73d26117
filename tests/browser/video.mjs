// Browser check of the simulator's video: the stock frontend served by `comfyume-sim
// --front-end-root` loads the workshop template "LTX-2 - text to video (distilled)", the real
// Run button is pressed, and the SaveVideo result (an H.264 MP4 in subfolder "video") plays in
// the frontend's own <video> element: readyState 4 (HAVE_ENOUGH_DATA), no error, the time
// advances, and a drawn frame shows the white SIMULATED stamp.
//
//   BASE_URL=http://127.0.0.1:PORT/<base path> OUT_DIR=/tmp/video node tests/browser/video.mjs
//
// With USER1 and PASS1 the same runs through `comfyume serve` at BASE_URL: the participant
// signs in through the login page first, and the result comes from their own folder, in
// subfolder "video" as ComfyUI put it.
//
// Optional: CHROMIUM, STORY_TIMEOUT_MS (per wait, default 60000), TEMPLATE (default
// "LTX-2 - text to video (distilled)"), TEMPLATES_DIR (default crates/templates/workflows).
//
// Exit codes: 0 passed (JSON summary on stdout); 1 failed (reason on stderr, screenshots in
// OUT_DIR); 2 bad usage.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cfg, fail, log, login, navigate, newParticipant, runStory, setup, shot, step, waitForComfy } from './lib.mjs';

const env = process.env;
setup('video', ['BASE_URL'], 'BASE_URL=http://127.0.0.1:PORT/BASE [OUT_DIR=..] node video.mjs');
const LABEL = 'sim';
const TEMPLATE = env.TEMPLATE || 'LTX-2 - text to video (distilled)';
const TEMPLATES_DIR = env.TEMPLATES_DIR
  ? path.resolve(env.TEMPLATES_DIR)
  : path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../crates/templates/workflows');
const workflow = JSON.parse(readFileSync(path.join(TEMPLATES_DIR, `${TEMPLATE}.json`), 'utf8'));

runStory(async (browser, summary) => {
  summary.template = TEMPLATE;
  const { context, page } = await newParticipant(browser, LABEL);
  // What the server answered for every /api/view the page made.
  const viewed = [];
  context.on('response', (res) => {
    if (new URL(res.url()).pathname.endsWith('/api/view')) {
      viewed.push({ url: res.url(), status: res.status(), type: res.headers()['content-type'] ?? '' });
    }
  });

  await step(env.USER1 ? 'the participant signs in and the frontend loads' : 'the simulator serves the stock frontend', async () => {
    if (env.USER1) await login(page, LABEL, env.USER1, env.PASS1);
    else await navigate(() => page.goto(`${cfg.BASE_URL}/`, { waitUntil: 'domcontentloaded', timeout: cfg.TIMEOUT }));
    summary.loaded = await waitForComfy(page, LABEL);
    summary.codecs = await page.evaluate(() => {
      const v = document.createElement('video');
      return Object.fromEntries(
        ['video/mp4; codecs="avc1.42C01E"', 'video/mp4; codecs="avc1.640028"', 'video/webm; codecs="vp9"'].map((t) => [t, v.canPlayType(t)]),
      );
    });
    log(`canPlayType: ${JSON.stringify(summary.codecs)}`);
  });

  const save = await step(`the template "${TEMPLATE}" is loaded`, async () => {
    await page.evaluate((wf) => window.app.loadGraphData(wf), workflow);
    const nodes = await page.evaluate(() => window.app.graph.nodes.map((n) => ({ id: String(n.id), type: n.type })));
    const node = nodes.find((n) => n.type === 'SaveVideo');
    if (!node || nodes.length !== workflow.nodes.length) fail(`the graph has ${nodes.length} nodes and no SaveVideo: ${JSON.stringify(nodes)}`);
    await shot(page, 'template');
    return node;
  });

  const output = await step('Run is pressed and the job finishes', async () => {
    await page.evaluate(() => {
      const events = [];
      window.__events = events;
      for (const type of ['executed', 'execution_success', 'execution_error', 'execution_interrupted']) {
        window.comfyAPI.api.api.addEventListener(type, (e) => events.push({ type, detail: JSON.parse(JSON.stringify(e.detail ?? null)) }));
      }
    });
    const queued = page.waitForResponse((r) => r.request().method() === 'POST' && new URL(r.url()).pathname.endsWith('/api/prompt'), {
      timeout: cfg.TIMEOUT,
    });
    await page.getByRole('button', { name: 'Run', exact: true }).click();
    const res = await queued.catch(() => fail('pressing Run sent no POST /api/prompt'));
    const body = await res.json().catch(() => ({}));
    if (res.status() !== 200 || !body.prompt_id) fail(`POST /api/prompt answered ${res.status()} ${JSON.stringify(body)}`);
    await page
      .waitForFunction(() => window.__events.some((e) => e.type.startsWith('execution_')), null, { timeout: cfg.TIMEOUT })
      .catch(() => fail(`job ${body.prompt_id} did not finish`));
    const events = await page.evaluate(() => window.__events);
    const end = events.find((e) => e.type.startsWith('execution_'));
    if (end.type !== 'execution_success') fail(`the job ended with ${end.type}: ${JSON.stringify(end.detail).slice(0, 500)}`);
    // The seed the prompt carried, and the widget after the run: with "control after generate:
    // randomize" the frontend changes the widget once the prompt is queued, so the picture
    // (and its stamp) shows the seed that was sent, as with ComfyUI.
    const sent = Object.values(res.request().postDataJSON().prompt).find((n) => n.class_type === 'RandomNoise');
    summary.seed = {
      sent: sent?.inputs?.noise_seed,
      widget_after_run: await page.evaluate(
        () => window.app.graph.nodes.find((n) => n.type === 'RandomNoise')?.widgets?.find((w) => w.name === 'noise_seed')?.value,
      ),
    };
    const executed = events.find((e) => e.type === 'executed' && String(e.detail?.node) === save.id);
    const out = executed?.detail?.output;
    // ComfyUI's SaveVideo announces its file under "images", flagged animated.
    const file = out?.images?.[0];
    if (!file || JSON.stringify(out.animated) !== '[true]' || !file.filename.endsWith('.mp4') || file.subfolder !== 'video' || file.type !== 'output') {
      fail(`SaveVideo (node ${save.id}) sent ${JSON.stringify(out)}`);
    }
    summary.executed = out;
    return file;
  });

  await step('the MP4 comes from /api/view as video/mp4', async () => {
    const url = new URL(`${cfg.BASE_URL}/api/view`);
    for (const k of ['filename', 'subfolder', 'type']) url.searchParams.set(k, output[k]);
    const res = await context.request.get(url.href, { failOnStatusCode: false });
    const body = await res.body();
    const type = res.headers()['content-type'] ?? '';
    if (res.status() !== 200 || type !== 'video/mp4' || body.toString('latin1', 4, 8) !== 'ftyp') {
      fail(`GET ${url.href} answered ${res.status()} ${type} (${body.length} bytes)`);
    }
    summary.mp4_bytes = body.length;
  });

  const played = await step('the frontend plays it in a <video> element', async () => {
    await page.evaluate(() => {
      window.__findVideo = (filename, subfolder) =>
        [...document.querySelectorAll('video')].find((v) => {
          const u = new URL(v.currentSrc || v.src || 'about:blank', location.href);
          return u.searchParams.get('filename') === filename && u.searchParams.get('subfolder') === subfolder;
        });
    });
    await page
      .waitForFunction(
        ([f, s]) => {
          const v = window.__findVideo(f, s);
          return v && (v.readyState === 4 || v.error);
        },
        [output.filename, output.subfolder],
        { timeout: cfg.TIMEOUT },
      )
      .catch(async () => {
        const videos = await page.evaluate(() =>
          [...document.querySelectorAll('video')].map((v) => ({ src: v.currentSrc || v.src, readyState: v.readyState, error: v.error?.message ?? null })),
        );
        fail(`no <video> of ${output.filename} reached readyState 4 (videos: ${JSON.stringify(videos)})`);
      });
    const state = await page.evaluate(
      async ([f, s]) => {
        const v = window.__findVideo(f, s);
        const before = { readyState: v.readyState, error: v.error ? `${v.error.code} ${v.error.message}` : null };
        v.muted = true;
        await v.play().catch(() => {});
        const t0 = performance.now();
        while (v.currentTime < 0.4 && performance.now() - t0 < 20_000) await new Promise((r) => setTimeout(r, 50));
        v.pause();
        // The frame on screen, drawn to a canvas: the stamp's white letters are there.
        const c = document.createElement('canvas');
        c.width = v.videoWidth;
        c.height = v.videoHeight;
        const g = c.getContext('2d');
        g.drawImage(v, 0, 0);
        const px = g.getImageData(0, 0, c.width, c.height).data;
        let white = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i] > 240 && px[i + 1] > 240 && px[i + 2] > 240) white += 1;
        return {
          ...before,
          currentTime: v.currentTime,
          duration: v.duration,
          width: v.videoWidth,
          height: v.videoHeight,
          whitePixels: white,
          src: v.currentSrc,
          errorAfterPlay: v.error ? `${v.error.code} ${v.error.message}` : null,
        };
      },
      [output.filename, output.subfolder],
    );
    log(`video: ${JSON.stringify(state)}`);
    if (state.error || state.errorAfterPlay) fail(`the <video> has an error: ${state.error || state.errorAfterPlay}`);
    if (state.readyState !== 4) fail(`the <video> is at readyState ${state.readyState}, not 4`);
    if (!(state.currentTime >= 0.4)) fail(`the <video> did not play: currentTime ${state.currentTime}`);
    if (Math.abs(state.duration - 97 / 25) > 0.05) fail(`the <video> lasts ${state.duration} s, not 97 frames at 25 fps`);
    if (state.width !== 320 || state.height !== 212) fail(`the <video> is ${state.width}x${state.height}, not 320x212`);
    if (state.whitePixels < 500) fail(`the drawn frame shows no SIMULATED stamp (${state.whitePixels} white pixels)`);
    const own = viewed.filter((v) => new URL(v.url).searchParams.get('filename') === output.filename);
    if (!own.length || own.some((v) => v.status >= 400)) fail(`the page's own loads of ${output.filename}: ${JSON.stringify(own)}`);
    await shot(page, 'video-playing');
    return state;
  });
  summary.video = played;
});
