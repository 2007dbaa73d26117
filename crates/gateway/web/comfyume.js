// ComfyUMe: a small banner telling the participant who they are, where their job stands and
// how much room their files take, and "Download my work" (in the Workflow menu and the
// banner). Loaded by the stock frontend through /api/extensions.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BANNER_ID = "comfyume-banner";
const DOWNLOAD_COMMAND = "ComfyUMe.DownloadMyWork";

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

/** Bytes for people: 512 B, 1.5 KB, 12.3 MB (powers of 1024, as the server says them). */
function human(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
}

/** The participant's outputs and saved workflows as one zip, streamed by the server. */
function downloadMyWork() {
  const a = document.createElement("a");
  a.href = api.apiURL("/comfyume/export.zip");
  a.download = "";
  a.style.display = "none";
  document.body.appendChild(a);
  a.click();
  a.remove();
}

let last = null; // the latest /comfyume/status
/** The serverless GPU line (`/comfyume/gpu`), or null. */
let gpu = null;
let notice = null; // the latest "comfyume" message, until the next status

function render() {
  const el = banner();
  const parts = [];
  if (last) {
    parts.push(`Signed in as ${last.user}`);
    if (last.backend) parts.push(`GPU: ${last.backend}`);
    if (gpu?.gpu) parts.push(gpu.gpu);
    if (gpu?.gpu_time_text) parts.push(gpu.gpu_time_text);
    if (last.storage) {
      const { used_bytes: used, quota_bytes: quota } = last.storage;
      parts.push(quota ? `Storage: ${human(used)} of ${human(quota)}` : `Storage: ${human(used)}`);
    }
  }
  const message = notice ?? last?.message;
  if (message) parts.push(message);
  // textContent: nothing the server or a message says is ever read as markup.
  el.textContent = parts.join(" · ");
  const link = (text, href, onClick) => {
    const a = document.createElement("a");
    a.textContent = text;
    a.href = href;
    a.style.cssText = "color:#9cf;margin-left:8px";
    if (onClick) {
      a.addEventListener("click", (e) => {
        e.preventDefault();
        onClick();
      });
    }
    el.appendChild(a);
    return a;
  };
  link("Download my work", "#", downloadMyWork).id = "comfyume-download";
  link("Sign out", `${location.origin}/logout`);
}

async function refresh() {
  try {
    // Serverless GPUs only (nulls otherwise): a cold start under way, GPU time today.
    const [r, g] = await Promise.all([api.fetchApi("/comfyume/status"), api.fetchApi("/comfyume/gpu")]);
    if (!r.ok) return;
    last = await r.json();
    gpu = g.ok ? await g.json() : null;
    notice = null;
    render();
  } catch (_) {
    // The banner is informational; the UI works without it.
  }
}

/** The banner refreshes once the socket has been quiet this long after a queue `status`... */
const QUIET_MS = 300;
/** ...or this long after the first `status`, if the socket never goes quiet (a long job's progress). */
const AT_MOST_MS = 2000;
let quietTimer = null;
let firstStatusAt = null;

function refreshNow() {
  clearTimeout(quietTimer);
  quietTimer = null;
  firstStatusAt = null;
  refresh();
}

/** ComfyUI sends `status` two or three times around each job. The banner's two fetches wait
 *  until the job's own events, and the result image they make the page fetch, are through:
 *  every later event of the job pushes the refresh back, up to AT_MOST_MS. */
function onStatus() {
  firstStatusAt ??= performance.now();
  rearm();
}
function rearm() {
  if (firstStatusAt === null) return; // no refresh pending
  clearTimeout(quietTimer);
  const left = firstStatusAt + AT_MOST_MS - performance.now();
  quietTimer = setTimeout(refreshNow, Math.max(0, Math.min(QUIET_MS, left)));
}
/** The events of a running job that postpone a pending refresh. */
const JOB_EVENTS = ["execution_start", "executing", "progress", "progress_state", "executed", "execution_success", "b_preview"];

app.registerExtension({
  name: "comfyume.banner",
  commands: [
    {
      id: DOWNLOAD_COMMAND,
      label: "Download my work",
      menubarLabel: "Download my work",
      icon: "pi pi-download",
      tooltip: "Your outputs and saved workflows as one zip file",
      function: downloadMyWork,
    },
  ],
  menuCommands: [{ path: ["Workflow"], commands: [DOWNLOAD_COMMAND] }],
  async setup() {
    await refresh();
    api.addEventListener("status", onStatus);
    for (const type of JOB_EVENTS) api.addEventListener(type, rearm);
    api.addEventListener("comfyume", (e) => {
      if (e.detail && "broadcast" in e.detail) showBroadcast(e.detail.broadcast);
      if (e.detail && e.detail.message) {
        notice = String(e.detail.message);
        render();
      }
    });
    // A broadcast set or cleared while the socket was down (a restart of the server).
    api.addEventListener("reconnected", loadBroadcast);
    await loadBroadcast();
  },
});
