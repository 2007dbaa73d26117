// ComfyUMe instructor dashboard. Served by the binary; no build step, no dependencies.
// Everything on the page comes from one WebSocket (/admin/ws): a snapshot of every section,
// then the sections that changed. Actions go to /admin/api/ with the session's CSRF token.
// Participant text (names, file names) only ever becomes text nodes, never HTML.
'use strict';

(() => {
  const body = document.body;
  const VIEW = body.dataset.view || 'dashboard';
  const state = { sections: {}, skew: 0, tab: 'queue', connected: false };
  let csrf = document.querySelector('meta[name="csrf-token"]')?.content || '';

  // ---- DOM helpers (text only) ----
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const short = (id) => (id || '').slice(0, 8);
  const now = () => Date.now() + state.skew;
  function dur(ms) {
    if (ms === null || ms === undefined || ms < 0) return '–';
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${s % 60}s`;
    return `${Math.floor(m / 60)}h ${m % 60}m`;
  }
  function ago(ms) {
    return ms ? `${dur(now() - ms)} ago` : '–';
  }
  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const u = ['B', 'KB', 'MB', 'GB', 'TB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) {
      n /= 1024;
      i++;
    }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  }
  const clock = (ms) => (ms ? new Date(ms).toLocaleTimeString() : '–');
  // A live duration: redrawn every second by the page's own timer (no request).
  const since = (ms, cls) => h('span', { class: `since ${cls || ''}`, dataset: { since: ms || '' } }, dur(now() - ms));

  // ---- messages and actions ----
  function toast(text, bad) {
    const t = h('div', { class: `toast${bad ? ' bad' : ''}`, role: 'status' }, text);
    document.getElementById('toasts').append(t);
    setTimeout(() => t.remove(), bad ? 8000 : 4000);
  }
  async function api(method, path, payload) {
    const opts = { method, headers: { 'X-CSRF-Token': csrf }, credentials: 'same-origin' };
    if (payload !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(payload);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      toast(`${method} ${path}: ${e}`, true);
      throw e;
    }
    const text = await res.text();
    let data = {};
    try {
      data = text ? JSON.parse(text) : {};
    } catch {
      data = { error: text };
    }
    if (!res.ok) {
      toast(data.error || `${method} ${path}: HTTP ${res.status}`, true);
      throw new Error(data.error || `HTTP ${res.status}`);
    }
    return data;
  }
  function button(label, onclick, attrs) {
    return h('button', { type: 'button', ...(attrs || {}), onclick: (e) => { e.stopPropagation(); onclick(e); } }, label);
  }
  function confirmThen(question, fn) {
    return () => {
      if (window.confirm(question)) fn();
    };
  }
  // Shows a secret once (a new password), with a button to copy it.
  function showOnce(title, lines) {
    const dlg = h('dialog', { class: 'once' },
      h('h3', {}, title),
      ...lines.map(([k, v]) => h('p', {}, h('span', { class: 'k' }, `${k}: `), h('code', { class: 'secret' }, v))),
      h('p', { class: 'note' }, 'Shown once: it is stored only as a hash.'),
      button('Done', () => { dlg.close(); dlg.remove(); }));
    document.body.append(dlg);
    dlg.showModal();
  }

  // ---- the stream ----
  let retry = 0;
  function connect() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/admin/ws`);
    const live = document.getElementById('live');
    ws.onopen = () => {
      retry = 0;
    };
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.now_ms) state.skew = msg.now_ms - Date.now();
      if (msg.type === 'snapshot') {
        state.sections = msg.sections;
        if (msg.csrf) csrf = msg.csrf;
        state.connected = true;
        live.textContent = 'live';
        live.className = 'live on';
        renderAll();
      } else if (msg.type === 'update') {
        Object.assign(state.sections, msg.sections);
        renderSections(Object.keys(msg.sections));
      }
    };
    ws.onclose = () => {
      state.connected = false;
      live.textContent = 'reconnecting…';
      live.className = 'live off';
      retry = Math.min(retry + 1, 5);
      setTimeout(connect, 500 * retry);
    };
  }

  // ---- layout ----
  const TABS = [
    ['queue', 'Queue'],
    ['results', 'Results'],
    ['participants', 'Participants'],
    ['gpus', 'GPUs'],
    ['system', 'System'],
    ['audit', 'Audit log'],
  ];
  const panes = {};
  function layout() {
    const app = document.getElementById('app');
    app.textContent = '';
    app.append(h('div', { id: 'toasts' }));
    if (VIEW === 'room') {
      for (const k of ['room-now', 'room-main', 'room-next']) panes[k] = h('section', { class: k, id: k });
      app.append(h('div', { class: 'room' }, panes['room-now'], panes['room-main'], panes['room-next']));
      return;
    }
    const nav = document.getElementById('tabs');
    nav.textContent = '';
    for (const [key, label] of TABS) {
      nav.append(button(label, () => selectTab(key), { id: `tab-${key}`, class: 'tab', 'aria-controls': `pane-${key}` }));
    }
    nav.append(h('a', { href: '/admin/room', target: '_blank', class: 'tab room-link' }, 'Room view ↗'));
    app.append(broadcastBar());
    for (const [key] of TABS) {
      panes[key] = h('section', { id: `pane-${key}`, class: 'pane', hidden: true });
      app.append(panes[key]);
    }
    selectTab(location.hash.slice(1) || 'queue');
  }
  function selectTab(key) {
    if (!panes[key]) key = 'queue';
    state.tab = key;
    for (const [k] of TABS) {
      panes[k].hidden = k !== key;
      document.getElementById(`tab-${k}`).classList.toggle('active', k === key);
    }
    history.replaceState(null, '', `#${key}`);
  }

  function broadcastBar() {
    const input = h('input', { id: 'broadcast-text', type: 'text', maxlength: 500, placeholder: 'Message to every participant, e.g. "5 minutes left"' });
    const current = h('span', { id: 'broadcast-current', class: 'current' });
    const form = h('form', { id: 'broadcast', class: 'broadcast', onsubmit: async (e) => {
      e.preventDefault();
      if (!input.value.trim()) return;
      await api('POST', '/admin/api/broadcast', { message: input.value });
      input.value = '';
      toast('Broadcast sent');
    } },
    h('label', { for: 'broadcast-text' }, 'Broadcast'), input,
    h('button', { type: 'submit', id: 'broadcast-send' }, 'Send'),
    button('Clear', () => api('DELETE', '/admin/api/broadcast'), { id: 'broadcast-clear' }),
    current);
    return form;
  }

  // ---- rendering ----
  function renderAll() {
    renderSections(Object.keys(state.sections));
  }
  const RENDER = {
    queue: () => (VIEW === 'room' ? renderRoom() : renderQueue()),
    progress: () => (VIEW === 'room' ? renderRoom() : renderProgress()),
    results: () => (VIEW === 'room' ? renderRoom() : renderResults()),
    participants: () => VIEW !== 'room' && renderParticipants(),
    gpus: () => VIEW !== 'room' && renderGpus(),
    system: () => VIEW !== 'room' && renderSystem(),
    audit: () => VIEW !== 'room' && renderAudit(),
    broadcast: () => renderBroadcast(),
    room: () => (VIEW === 'room' ? renderRoom() : renderResults()),
  };
  function renderSections(keys) {
    for (const k of new Set(keys)) {
      try {
        RENDER[k]?.();
      } catch (e) {
        console.error(`rendering ${k}:`, e);
      }
    }
  }

  function renderBroadcast() {
    const b = state.sections.broadcast;
    const banner = document.getElementById('banner');
    banner.hidden = !b;
    banner.textContent = b ? `Broadcast: ${b.message}` : '';
    const cur = document.getElementById('broadcast-current');
    if (cur) cur.textContent = b ? `showing: “${b.message}”` : 'no message showing';
    if (VIEW === 'room') renderRoom();
  }

  function table(cls, head, rows) {
    return h('table', { class: cls },
      h('thead', {}, h('tr', {}, head.map((c) => h('th', {}, c)))),
      h('tbody', {}, rows));
  }

  function progressCell(id) {
    const p = (state.sections.progress || {})[id];
    if (!p) return h('span', { class: 'muted' }, 'waiting on the GPU');
    const parts = [];
    if (p.node) parts.push(`node ${p.node}${p.class_type ? ` (${p.class_type})` : ''}`);
    if (p.max) parts.push(`step ${p.value}/${p.max}`);
    if (p.nodes_total) parts.push(`${p.nodes_done}/${p.nodes_total} nodes`);
    const frac = p.max ? p.value / p.max : p.nodes_total ? p.nodes_done / p.nodes_total : 0;
    const bar = h('div', { class: 'bar' }, h('div', { class: 'fill' }));
    bar.firstChild.style.width = `${Math.round(frac * 100)}%`;
    return h('div', { class: 'progress', dataset: { job: id } }, bar, h('span', {}, parts.join(' · ')));
  }

  function renderProgress() {
    for (const el of document.querySelectorAll('.progress-cell')) {
      const id = el.dataset.job;
      el.textContent = '';
      el.append(progressCell(id));
    }
  }

  function levelSelect(value, onchange, attrs) {
    const sel = h('select', { ...(attrs || {}), onchange: (e) => onchange(e.target.value === '' ? null : Number(e.target.value)) },
      h('option', { value: '' }, '–'), [0, 1, 2, 3].map((l) => h('option', { value: l }, String(l))));
    sel.value = value === null || value === undefined ? '' : String(value);
    return sel;
  }

  function renderQueue() {
    const q = state.sections.queue;
    const pane = panes.queue;
    if (!q || !pane) return;
    pane.textContent = '';
    const policy = h('select', { id: 'policy', onchange: (e) => api('PUT', '/admin/api/queue/policy', { policy: e.target.value }) },
      ['fifo', 'round_robin', 'priority'].map((p) => h('option', { value: p }, p)));
    policy.value = q.policy;
    const lim = q.limits;
    const limitInput = (name, v, min) => h('input', { type: 'number', min, name, value: v, class: 'num', 'aria-label': name });
    const limits = h('form', { class: 'limits', onsubmit: (e) => {
      e.preventDefault();
      const f = new FormData(e.target);
      const payload = {};
      for (const [k, v] of f.entries()) payload[k] = Number(v);
      api('PUT', '/admin/api/queue/limits', payload).then(() => toast('Limits saved'));
    } },
    h('label', {}, 'running / participant ', limitInput('max_running_per_user', lim.max_running_per_user, 1)),
    h('label', {}, 'waiting / participant ', limitInput('max_queued_per_user', lim.max_queued_per_user, 0)),
    h('label', {}, 'queue depth ', limitInput('max_queue_depth', lim.max_queue_depth, 0)),
    h('button', { type: 'submit' }, 'Apply'));
    const pause = q.paused
      ? button('Resume dispatch', () => api('POST', '/admin/api/queue/resume'), { id: 'resume', class: 'primary' })
      : button('Pause dispatch', () => api('POST', '/admin/api/queue/pause'), { id: 'pause' });
    pane.append(h('div', { class: 'controls' },
      h('label', {}, 'Policy ', policy), pause,
      button('Cancel all waiting', confirmThen('Cancel every waiting job of everyone?', () => api('POST', '/admin/api/queue/cancel')), { class: 'danger' }),
      limits));
    if (q.paused) pane.append(h('p', { id: 'paused-note', class: 'warn' }, 'Dispatch is paused: running jobs finish, nothing new starts.'));

    pane.append(h('h2', {}, `Running (${q.running.length})`));
    pane.append(table('jobs running', ['Job', 'Participant', 'Backend', 'Progress', 'Elapsed', 'Tries', ''],
      q.running.map((j) => h('tr', { dataset: { job: j.id } },
        h('td', { class: 'mono', title: j.id }, short(j.id)),
        h('td', {}, j.user),
        h('td', {}, j.backend || '–'),
        h('td', { class: 'progress-cell', dataset: { job: j.id } }, progressCell(j.id)),
        h('td', {}, j.started_at_ms ? since(j.started_at_ms) : h('span', { class: 'muted' }, j.state)),
        h('td', {}, j.attempts),
        h('td', {}, button('Cancel', () => api('POST', `/admin/api/jobs/${encodeURIComponent(j.id)}/cancel`), { class: 'cancel' }))))));

    pane.append(h('h2', {}, `Waiting (${q.waiting_total}) — in the order the ${q.policy} policy serves them`));
    pane.append(table('jobs waiting', ['#', 'Job', 'Participant', 'Waiting', 'Priority', 'Tries', ''],
      q.waiting.map((j) => h('tr', { dataset: { job: j.id }, class: j.front ? 'front' : '' },
        h('td', {}, j.position + 1),
        h('td', { class: 'mono', title: j.id }, short(j.id), j.front ? h('span', { class: 'badge' }, 'front') : null),
        h('td', {}, j.user),
        h('td', {}, since(j.created_at_ms)),
        h('td', {}, levelSelect(j.priority, (level) => api('PUT', `/admin/api/jobs/${encodeURIComponent(j.id)}/priority`, { level }), { 'aria-label': 'job priority' })),
        h('td', {}, j.attempts),
        h('td', {},
          button('To front', () => api('POST', `/admin/api/jobs/${encodeURIComponent(j.id)}/front`), { class: 'front-btn' }),
          button('Cancel', () => api('POST', `/admin/api/jobs/${encodeURIComponent(j.id)}/cancel`), { class: 'cancel' }))))));
    if (q.waiting_total > q.waiting.length) pane.append(h('p', { class: 'muted' }, `… and ${q.waiting_total - q.waiting.length} more`));
  }

  function media(file, big) {
    if (file.kind === 'video') {
      // The first frame is the poster; nothing plays until asked.
      return h('video', { src: `${file.url}#t=0.1`, preload: 'metadata', muted: true, controls: big ? true : null, playsinline: true });
    }
    if (file.kind === 'audio') return h('audio', { src: file.url, controls: true, preload: 'none' });
    return h('img', { src: big ? file.url : file.thumb || file.url, alt: file.filename, loading: 'lazy' });
  }

  function openFull(result, file) {
    const dlg = h('dialog', { class: 'full', onclick: (e) => { if (e.target === dlg) { dlg.close(); dlg.remove(); } } },
      h('div', { class: 'full-head' },
        h('span', {}, `${result.user} · ${file.filename}`),
        button('Put on room view', () => api('PUT', '/admin/api/room', { job_id: result.id, file: result.files.indexOf(file) }).then(() => toast('On the room view'))),
        button('Close', () => { dlg.close(); dlg.remove(); })),
      media(file, true));
    document.body.append(dlg);
    dlg.showModal();
  }

  let resultCards = new Map();
  function renderResults() {
    const pane = panes.results;
    const results = state.sections.results;
    if (!pane || !Array.isArray(results)) return;
    pane.textContent = '';
    const room = state.sections.room;
    pane.append(h('div', { class: 'controls' },
      room ? h('span', {}, `Room view shows ${room.user} · ${room.file.filename} `) : h('span', { class: 'muted' }, 'Room view shows the latest results '),
      room ? button('Show latest instead', () => api('DELETE', '/admin/api/room')) : null));
    const grid = h('div', { class: 'grid' });
    // A finished result never changes, so its card is kept across renders: a new result
    // arriving does not make every thumbnail load (and flicker) again.
    const kept = new Map();
    for (const r of results) {
      r.files.forEach((f, i) => {
        const key = `${r.id}\u0000${i}\u0000${f.url}`;
        let card = resultCards.get(key);
        if (!card) {
          card = h('figure', { class: `card ${f.kind}`, dataset: { job: r.id }, onclick: () => openFull(r, f), tabindex: 0 },
            media(f, false),
            h('figcaption', {}, h('b', {}, r.user), ` · ${clock(r.finished_at_ms)}`, h('br'), h('span', { class: 'fname' }, f.filename)),
            button('Room view', () => api('PUT', '/admin/api/room', { job_id: r.id, file: i }).then(() => toast('On the room view')), { class: 'room-btn' }));
        }
        kept.set(key, card);
        grid.append(card);
      });
    }
    resultCards = kept;
    if (!results.length) grid.append(h('p', { class: 'muted' }, 'No results yet.'));
    pane.append(grid);
  }

  function renderParticipants() {
    const pane = panes.participants;
    const list = state.sections.participants;
    if (!pane || !Array.isArray(list)) return;
    pane.textContent = '';
    const name = h('input', { name: 'name', placeholder: 'user021', required: true, pattern: '[A-Za-z0-9_][A-Za-z0-9_-]{0,63}', 'aria-label': 'new participant name' });
    const admin = h('input', { type: 'checkbox', name: 'admin' });
    pane.append(h('form', { class: 'controls', id: 'create-user', onsubmit: async (e) => {
      e.preventDefault();
      const r = await api('POST', '/admin/api/users', { name: name.value.trim(), admin: admin.checked });
      name.value = '';
      showOnce(`Account ${r.name} created`, [['name', r.name], ['password', r.password]]);
    } }, h('b', {}, 'New participant '), name, h('label', {}, admin, ' instructor'), h('button', { type: 'submit' }, 'Create'),
    h('a', { href: '/admin/api/export.zip', class: 'button', download: '' }, 'Download everyone’s work (zip)')));
    const online = list.filter((u) => u.online > 0).length;
    pane.append(h('h2', {}, `${list.length} accounts, ${online} online now`));
    pane.append(table('people', ['Name', 'Online', 'Waiting', 'Running', 'Done', 'Failed', 'GPU time', 'Last activity', 'Storage', 'Level', ''],
      list.map((u) => h('tr', { dataset: { user: u.name }, class: u.disabled ? 'disabled' : '' },
        h('td', {}, h('a', { href: u.ui, target: '_blank', rel: 'noopener' }, u.name), u.admin ? h('span', { class: 'badge' }, 'instructor') : null, u.disabled ? h('span', { class: 'badge bad' }, 'disabled') : null),
        h('td', {}, u.online ? h('span', { class: 'dot on' }, String(u.online)) : h('span', { class: 'dot' }, '0')),
        h('td', {}, u.queued), h('td', {}, u.running), h('td', {}, u.done), h('td', {}, u.failed),
        h('td', {}, dur(u.gpu_ms)),
        h('td', {}, u.last_activity_ms ? h('span', { class: 'since-ago', dataset: { ago: u.last_activity_ms } }, ago(u.last_activity_ms)) : '–'),
        h('td', {}, bytes(u.storage_bytes)),
        h('td', {}, levelSelect(u.level, (level) => api('PUT', `/admin/api/users/${encodeURIComponent(u.name)}/priority`, { level }), { 'aria-label': 'participant priority' })),
        h('td', { class: 'actions' },
          button('Cancel jobs', () => api('POST', `/admin/api/users/${encodeURIComponent(u.name)}/cancel`)),
          u.disabled
            ? button('Enable', () => api('POST', `/admin/api/users/${encodeURIComponent(u.name)}/enable`))
            : button('Disable', confirmThen(`Disable ${u.name}? Their sessions end and their jobs stop.`, () => api('POST', `/admin/api/users/${encodeURIComponent(u.name)}/disable`))),
          button('Reset password', confirmThen(`Give ${u.name} a new password?`, async () => {
            const r = await api('POST', `/admin/api/users/${encodeURIComponent(u.name)}/password`);
            showOnce(`New password for ${r.name}`, [['name', r.name], ['password', r.password]]);
          })),
          h('a', { href: `/admin/api/users/${encodeURIComponent(u.name)}/export.zip`, class: 'button', download: '' }, 'Zip'))))));
  }

  function svg(tag, attrs) {
    const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    return el;
  }

  function chart(c) {
    const W = 900, H = 160, P = 28;
    const box = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': 'queue depth and jobs per minute' });
    if (!c || !c.queue_depth || !c.queue_depth.length) return box;
    const n = c.queue_depth.length;
    const max = Math.max(1, ...c.queue_depth, ...c.finished);
    const x = (i) => P + ((W - 2 * P) * i) / Math.max(1, n - 1);
    const y = (v) => H - P - ((H - 2 * P) * v) / max;
    const bw = Math.max(1, (W - 2 * P) / n - 1);
    c.finished.forEach((v, i) => {
      if (v) box.append(svg('rect', { x: x(i) - bw / 2, y: y(v), width: bw, height: H - P - y(v), class: 'bar-finished' }));
    });
    box.append(svg('polyline', { points: c.queue_depth.map((v, i) => `${x(i)},${y(v)}`).join(' '), class: 'line-depth' }));
    box.append(svg('line', { x1: P, y1: H - P, x2: W - P, y2: H - P, class: 'axis' }));
    const label = (text, lx, ly, cls) => { const t = svg('text', { x: lx, y: ly, class: cls || 'label' }); t.textContent = text; box.append(t); };
    label(String(max), 2, P + 4);
    label('0', 2, H - P + 4);
    label(clock(c.start_ms), P, H - 6);
    label(clock(c.start_ms + (n - 1) * c.bucket_ms), W - P - 60, H - 6);
    label('— waiting jobs', W - 260, 14, 'legend-depth');
    label('▮ jobs finished per minute', W - 160, 14, 'legend-finished');
    return box;
  }

  // The serverless GPUs' routing controls (INFERENCE_MODE=serverless), asked once when the
  // GPU section first names such a backend, and again after each change made here.
  let serverless = null;
  let serverlessAsked = false;
  async function loadServerless() {
    try {
      const r = await fetch('/admin/api/serverless', { credentials: 'same-origin' });
      serverless = r.ok ? await r.json() : null;
    } catch {
      serverless = null;
    }
    renderGpus();
  }

  function renderGpus() {
    const pane = panes.gpus;
    const g = state.sections.gpus;
    if (!pane || !g) return;
    pane.textContent = '';
    pane.append(h('div', { class: 'controls' },
      h('span', {}, `Backend: ${g.label} · ${g.waiting} waiting`),
      button('Refresh node definitions', () => api('POST', '/admin/api/object-info/refresh', {}).then((r) => toast(`${r.nodes} node types from ${r.backend}`)))));
    const rows = [];
    for (const b of g.backends) {
      rows.push(h('tr', { dataset: { backend: b.name } },
        h('td', {}, b.name),
        h('td', {}, h('span', { class: `state ${b.state}` }, b.state)),
        h('td', {}, `${b.started} running, ${b.active - b.started} handed over / ${b.slots} slots`),
        h('td', {}, b.jobs_done), h('td', {}, b.jobs_failed),
        h('td', {}, b.recent_errors.length
          ? h('ul', { class: 'errors' }, b.recent_errors.slice(-3).reverse().map((e) => h('li', {}, `${clock(e.at_ms)} ${e.user} ${short(e.job_id)}: ${e.message}`)))
          : h('span', { class: 'muted' }, 'none')),
        h('td', {}, '–'), h('td', {}, '–')));
      for (const e of b.endpoints || []) {
        rows.push(h('tr', { class: 'endpoint', dataset: { endpoint: e.name } },
          h('td', {}, `↳ ${e.name}${e.role ? ` (${e.role})` : ''}`),
          h('td', {}, h('span', { class: `state ${e.state}` }, e.state)),
          h('td', {}, `${e.in_flight} in flight`), h('td', {}, '–'), h('td', {}, '–'),
          h('td', {}, e.recent_errors.length ? h('ul', { class: 'errors' }, e.recent_errors.slice(-3).reverse().map(([at, m]) => h('li', {}, `${clock(at)} ${m}`))) : h('span', { class: 'muted' }, 'none')),
          h('td', {}, e.cold_start_secs.length ? `${e.cold_start_secs.slice(-3).join(', ')} s` : '–'),
          h('td', {}, e.spend_eur === null || e.spend_eur === undefined ? '–' : `€${e.spend_eur.toFixed(2)}`)));
      }
    }
    if (!g.backends.length) rows.push(h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No backend: jobs stay queued.')));
    pane.append(table('gpus', ['Backend / endpoint', 'State', 'Jobs in flight', 'Done', 'Failed', 'Recent errors', 'Cold starts', 'Spend'], rows));
    pane.append(h('h2', {}, 'Today: waiting jobs and jobs finished per minute'), chart(g.chart));
    if (serverless) pane.append(serverlessPanel(serverless));
    if (!serverlessAsked && g.backends.some((b) => b.name === 'serverless' || (b.endpoints || []).length)) {
      serverlessAsked = true;
      loadServerless();
    }
  }

  function serverlessPanel(s) {
    const names = (s.endpoints || []).map((e) => e.name);
    const active = h('select', { id: 'sl-active' }, names.map((n) => h('option', { value: n }, n)));
    active.value = s.active;
    const failover = h('input', { id: 'sl-failover', value: (s.failover || []).join(', '), 'aria-label': 'failover order' });
    const apply = async () => {
      serverless = await api('PUT', '/admin/api/serverless', { active: active.value, failover: failover.value.split(',').map((x) => x.trim()).filter(Boolean) });
      toast('Routing changed');
      renderGpus();
    };
    const costs = s.costs || {};
    return h('div', { class: 'serverless' },
      h('h2', {}, 'Serverless routing'),
      h('div', { class: 'controls' },
        h('label', {}, 'Active endpoint ', active), h('label', {}, 'Failover order ', failover), button('Apply', apply),
        button('Warm up', () => api('POST', '/admin/api/serverless/warmup', { endpoint: active.value }).then(() => toast(`Warming ${active.value}`)))),
      h('p', {}, `GPU time cost €${(costs.total_gpu_cost_eur || 0).toFixed(2)} · replica time billed €${(costs.total_replica_cost_eur || 0).toFixed(2)}`));
  }

  function renderSystem() {
    const pane = panes.system;
    const s = state.sections.system;
    if (!pane || !s) return;
    pane.textContent = '';
    const d = s.disk || {};
    const defs = s.node_definitions || {};
    const kv = (k, v) => h('tr', {}, h('th', {}, k), h('td', {}, v));
    pane.append(table('kv', ['', ''], [
      kv('Version', s.version),
      kv('Up for', since(s.started_at_ms)),
      kv('Backend', s.backend),
      kv('Open participant sockets', s.sockets),
      kv('Dashboards open', s.dashboards),
      kv('Database', bytes(d.database)),
      kv('Outputs', bytes(d.outputs)),
      kv('Inputs (uploads)', bytes(d.inputs)),
      kv('Workflows and settings', bytes(d.user_data)),
      kv('Temporary files', bytes(d.temp)),
      kv('Frontend', bytes(d.frontend)),
      kv('Disk free', d.filesystem_total ? `${bytes(d.filesystem_free)} of ${bytes(d.filesystem_total)}` : '–'),
      kv('Node definitions', `${defs.count} node types${defs.source ? ` from ${defs.source}` : ''}${defs.updated_at_ms ? `, ${ago(defs.updated_at_ms)}` : ''}`),
    ]));
  }

  function renderAudit() {
    const pane = panes.audit;
    const a = state.sections.audit;
    if (!pane || !Array.isArray(a)) return;
    pane.textContent = '';
    pane.append(h('p', { class: 'muted' }, 'Every instructor action, newest first (the latest 50; GET /admin/api/audit pages through all).'));
    pane.append(table('audit', ['When', 'Who', 'What', 'On', 'Details'],
      a.map((e) => h('tr', {},
        h('td', {}, new Date(e.at_ms).toLocaleString()),
        h('td', {}, e.actor), h('td', { class: 'mono' }, e.action), h('td', { class: 'mono' }, e.target || '–'),
        h('td', { class: 'detail' }, JSON.stringify(e.detail))))));
  }

  // ---- the room view (projector) ----
  function renderRoom() {
    if (VIEW !== 'room') return;
    const q = state.sections.queue;
    const results = state.sections.results || [];
    const b = state.sections.broadcast;
    const nowPane = panes['room-now'];
    const main = panes['room-main'];
    const next = panes['room-next'];
    if (!q || !nowPane) return;
    nowPane.textContent = '';
    nowPane.append(h('h2', {}, 'Now running'));
    if (q.paused) nowPane.append(h('p', { class: 'warn' }, 'Paused'));
    for (const j of q.running) {
      nowPane.append(h('div', { class: 'run' }, h('b', {}, j.user), progressCell(j.id)));
    }
    if (!q.running.length) nowPane.append(h('p', { class: 'muted' }, 'Nothing right now'));
    next.textContent = '';
    next.append(h('h2', {}, `Queue (${q.waiting_total})`));
    next.append(h('ol', {}, q.waiting.slice(0, 12).map((j) => h('li', {}, j.user))));
    main.textContent = '';
    if (b) main.append(h('div', { class: 'room-broadcast' }, b.message));
    const pinned = state.sections.room;
    if (pinned) {
      main.append(h('figure', { class: 'pinned' }, media(pinned.file, true), h('figcaption', {}, pinned.user)));
    } else {
      const grid = h('div', { class: 'grid' });
      for (const r of results.slice(0, 6)) {
        const f = r.files[0];
        if (f) grid.append(h('figure', { class: 'card' }, media(f, false), h('figcaption', {}, r.user)));
      }
      main.append(h('h2', {}, 'Latest results'), grid);
    }
  }

  // The page's own clock for "waiting 3m 2s" and "2m ago": text only, no request.
  setInterval(() => {
    for (const el of document.querySelectorAll('[data-since]')) {
      const t = Number(el.dataset.since);
      if (t) el.textContent = dur(now() - t);
    }
    for (const el of document.querySelectorAll('[data-ago]')) el.textContent = ago(Number(el.dataset.ago));
  }, 1000);

  layout();
  connect();
})();
