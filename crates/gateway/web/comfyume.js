// ComfyUMe: a small banner telling the participant who they are and where
// their job stands. Loaded by the stock frontend through /api/extensions.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BANNER_ID = "comfyume-banner";

function banner() {
  let el = document.getElementById(BANNER_ID);
  if (!el) {
    el = document.createElement("div");
    el.id = BANNER_ID;
    el.style.cssText =
      "position:fixed;bottom:8px;left:50%;transform:translateX(-50%);z-index:10000;" +
      "background:rgba(20,20,28,.88);color:#eee;font:12px/1.4 system-ui,sans-serif;" +
      "padding:4px 12px;border-radius:12px;pointer-events:auto;max-width:70vw;";
    document.body.appendChild(el);
  }
  return el;
}

async function refresh() {
  try {
    const r = await api.fetchApi("/comfyume/status");
    if (!r.ok) return;
    const s = await r.json();
    const parts = [`Signed in as ${s.user}`];
    if (s.backend) parts.push(`GPU: ${s.backend}`);
    if (s.message) parts.push(s.message);
    // Serverless GPUs only (nulls otherwise): a cold start under way, GPU time today.
    const g = await api.fetchApi("/comfyume/gpu");
    if (g.ok) {
      const gpu = await g.json();
      if (gpu.gpu) parts.push(gpu.gpu);
      if (gpu.gpu_time_text) parts.push(gpu.gpu_time_text);
    }
    const logout = `<a href="${location.origin}/logout" style="color:#9cf;margin-left:8px">Sign out</a>`;
    banner().innerHTML = parts.map((p) => p.replace(/[<>&]/g, "")).join(" · ") + logout;
  } catch (_) {
    // The banner is informational; the UI works without it.
  }
}

app.registerExtension({
  name: "comfyume.banner",
  async setup() {
    await refresh();
    api.addEventListener("status", refresh);
    api.addEventListener("comfyume", (e) => {
      if (e.detail && e.detail.message) banner().textContent = e.detail.message;
    });
  },
});
