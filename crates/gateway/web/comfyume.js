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

// The instructor's broadcast: a bar at the top of every participant's ComfyUI until
// cleared. Text only (never parsed as HTML).
const BROADCAST_ID = "comfyume-broadcast";

function showBroadcast(b) {
  let el = document.getElementById(BROADCAST_ID);
  if (!b || !b.message) {
    if (el) el.remove();
    return;
  }
  if (!el) {
    el = document.createElement("div");
    el.id = BROADCAST_ID;
    el.setAttribute("role", "alert");
    el.style.cssText =
      "position:fixed;top:8px;left:50%;transform:translateX(-50%);z-index:10001;" +
      "background:#3a3210;color:#ffe08a;font:600 15px/1.4 system-ui,sans-serif;" +
      "padding:8px 18px;border-radius:10px;border:1px solid #806a20;max-width:80vw;" +
      "box-shadow:0 4px 18px rgba(0,0,0,.5);white-space:pre-wrap;";
    document.body.appendChild(el);
  }
  el.textContent = `📣 ${b.message}`;
}

async function loadBroadcast() {
  try {
    const r = await api.fetchApi("/comfyume/broadcast");
    if (r.ok) showBroadcast((await r.json()).broadcast);
  } catch (_) {
    // Informational; the next change arrives over the socket.
  }
}

async function refresh() {
  try {
    const r = await api.fetchApi("/comfyume/status");
    if (!r.ok) return;
    const s = await r.json();
    const parts = [`Signed in as ${s.user}`];
    if (s.backend) parts.push(`GPU: ${s.backend}`);
    if (s.message) parts.push(s.message);
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
      if (e.detail && "broadcast" in e.detail) showBroadcast(e.detail.broadcast);
      if (e.detail && e.detail.message) banner().textContent = e.detail.message;
    });
    // A broadcast set or cleared while the socket was down (a restart of the server).
    api.addEventListener("reconnected", loadBroadcast);
    await loadBroadcast();
  },
});
