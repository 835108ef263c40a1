// Arnela operator console: a one-page app over the service's JSON API.
// Everything the server sends is treated as untrusted: the DOM is built node by node and
// text goes in through text nodes only (never innerHTML).

const TOKEN_KEY = 'arnela.console.token';
const TASK_TYPES = ['send_email', 'send_sms', 'send_whatsapp', 'sync_calendar'];
const STATUSES = ['queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled'];
const REFRESH_MS = 5000;
const RATE_WINDOW_MS = 5 * 60 * 1000;
const DEAD_PAGE_LIMIT = 500;
const DEAD_MAX_PAGES = 4;
const TASKS_PAGE_LIMIT = 50;

const state = {
  user: null, // the /whoami answer
  generation: 0, // bumped on every navigation: stale async work checks it and stops
  refreshTimer: null,
  samples: [], // /stats samples for the rates: {t, totals: {type: {succeeded, enqueued}}}
  tasks: { filter: {}, pages: [null], page: 0 },
  dead: { filter: {} },
  flash: null, // a message to show once on the next render of a page: {text, kind}
  restoreFocus: null, // data-focus-key to focus after the next overview rebuild
  overviewMessage: null, // shows the result of a pause/resume on the overview
};

// ---------------------------------------------------------------- DOM helpers

/** Creates an element. attrs: class, text, testid, dataset-like data-* keys, on<event>. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = String(value);
    else if (key === 'testid') el.setAttribute('data-testid', value);
    else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function setChildren(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

function main() {
  return document.getElementById('main');
}

function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString();
}

function timeEl(iso) {
  if (!iso) return '—';
  return h('time', { datetime: iso, title: iso }, fmtTime(iso));
}

function fmtNumber(n) {
  return typeof n === 'number' && Number.isFinite(n) ? n.toLocaleString() : '—';
}

function fmtSeconds(s) {
  if (typeof s !== 'number' || !Number.isFinite(s)) return '—';
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const hr = Math.floor(m / 60);
  return `${hr} h ${m - hr * 60} min`;
}

function fmtDuration(ms) {
  if (typeof ms !== 'number' || !Number.isFinite(ms)) return null;
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function hhmmss(d) {
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
}

function localInputToIso(value) {
  if (!value) return undefined;
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? undefined : d.toISOString();
}

function statusBadge(status) {
  return h('span', { class: `badge status-${String(status).replace(/[^a-z_]/g, '')}`, 'data-status': status }, status);
}

function messageBox(text, kind = 'error', testid = 'page-message') {
  return h('p', {
    class: `message message-${kind}`,
    role: kind === 'error' ? 'alert' : 'status',
    testid,
  }, text);
}

function field(id, labelText, control, hint) {
  control.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, labelText), control, hint ? h('small', {}, hint) : null);
}

function selectEl(testid, options, value, allLabel) {
  const sel = h('select', { testid, name: testid });
  if (allLabel) sel.append(h('option', { value: '' }, allLabel));
  for (const opt of options) {
    const o = h('option', { value: opt }, opt);
    if (opt === value) o.selected = true;
    sel.append(o);
  }
  return sel;
}

function tableWrap(caption, headers, rows, attrs = {}) {
  const table = h('table', attrs,
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, headers.map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, rows));
  return h('div', { class: 'table-scroll', tabindex: '0', role: 'region', 'aria-label': caption, 'data-focus-key': `table-${caption}` }, table);
}

function isAdmin() {
  return state.user?.role === 'admin';
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, body) {
    const message = (body && typeof body.message === 'string' && body.message)
      || (status ? `The server answered ${status}` : 'The server could not be reached');
    super(message);
    this.status = status;
    this.body = body;
    this.code = body?.code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/**
 * Calls the API. Returns the parsed JSON body. `acceptStatus` lists non-2xx statuses whose
 * body is still a normal answer (e.g. 503 from /health).
 */
async function api(method, path, { body, tokenOverride, acceptStatus = [] } = {}) {
  const headers = { Accept: 'application/json' };
  const tok = tokenOverride ?? token();
  if (tok) headers.Authorization = `Bearer ${tok}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { message: `The server could not be reached (${err.message})` });
  }
  let data = null;
  const text = await res.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = { message: text.slice(0, 300) };
    }
  }
  if (res.ok || acceptStatus.includes(res.status)) return data;
  if (res.status === 401 && !tokenOverride && state.user) {
    // The token expired or was revoked: back to the sign-in page.
    signOut('Your session is no longer valid; please sign in again.');
  }
  throw new ApiError(res.status, data);
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

// ---------------------------------------------------------------- confirmation dialog

/** Shows the confirmation dialog. Resolves to {ok, reason}. */
function confirmDialog({ title, message, confirmLabel = 'Confirm', withReason = false }) {
  const dialog = document.getElementById('confirm-dialog');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-message').textContent = message;
  document.getElementById('confirm-ok').textContent = confirmLabel;
  const reasonField = document.getElementById('confirm-reason-field');
  const reasonInput = document.getElementById('confirm-reason');
  reasonField.hidden = !withReason;
  reasonInput.value = '';
  dialog.returnValue = '';
  const opener = document.activeElement;
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      const ok = dialog.returnValue === 'confirm';
      if (opener && opener.isConnected && typeof opener.focus === 'function') opener.focus();
      resolve({ ok, reason: reasonInput.value.trim() });
    }, { once: true });
    dialog.showModal();
    (withReason ? reasonInput : document.getElementById('confirm-cancel')).focus();
  });
}

// ---------------------------------------------------------------- session

function showSession() {
  const signedIn = Boolean(state.user);
  document.getElementById('main-nav').hidden = !signedIn;
  document.getElementById('session').hidden = !signedIn;
  document.getElementById('user-subject').textContent = signedIn ? state.user.subject : '';
  document.getElementById('user-role').textContent = signedIn ? state.user.role : '';
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.user = null;
  state.samples = [];
  state.flash = message ? { text: message, kind: 'error' } : null;
  showSession();
  if (location.hash === '#/signin') route();
  else location.hash = '#/signin';
}

// ---------------------------------------------------------------- router

function stopRefresh() {
  if (state.refreshTimer) clearTimeout(state.refreshTimer);
  state.refreshTimer = null;
}

function setActiveNav(name) {
  for (const a of document.querySelectorAll('#main-nav a')) {
    if (a.dataset.route === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function pageHeading(text) {
  return h('h1', { tabindex: '-1', testid: 'page-title' }, text);
}

function focusHeading() {
  const h1 = main().querySelector('h1');
  if (h1) h1.focus({ preventScroll: true });
}

async function route() {
  const gen = ++state.generation;
  stopRefresh();
  const path = (location.hash.replace(/^#/, '') || '/').split('?')[0];

  if (!token()) {
    if (path !== '/signin') {
      location.replace('#/signin');
      return;
    }
    setActiveNav(null);
    renderSignIn();
    return;
  }
  if (!state.user) {
    setChildren(main(), h('p', { class: 'loading' }, 'Checking your token…'));
    try {
      state.user = await api('GET', '/whoami');
    } catch (err) {
      if (gen !== state.generation) return;
      if (err.status === 401 || err.status === 403) {
        signOut(err.message);
        return;
      }
      setChildren(main(), messageBox(err.message));
      return;
    }
    if (gen !== state.generation) return;
    showSession();
  }
  if (path === '/signin') {
    location.replace('#/overview');
    return;
  }

  const taskMatch = path.match(/^\/tasks\/(.+)$/);
  const scheduleMatch = path.match(/^\/schedules\/(.+)$/);
  if (path === '/' || path === '/overview') {
    setActiveNav('overview');
    renderOverview(gen);
  } else if (path === '/tasks') {
    setActiveNav('tasks');
    renderTasks(gen);
  } else if (taskMatch) {
    setActiveNav('tasks');
    renderTimeline(gen, decodeURIComponent(taskMatch[1]));
  } else if (path === '/dead') {
    setActiveNav('dead');
    renderDead(gen);
  } else if (path === '/schedules') {
    setActiveNav('schedules');
    renderSchedules(gen);
  } else if (scheduleMatch) {
    setActiveNav('schedules');
    renderSchedule(gen, decodeURIComponent(scheduleMatch[1]));
  } else {
    setActiveNav(null);
    setChildren(main(), pageHeading('Not found'),
      h('p', {}, 'There is no such page. ', h('a', { href: '#/overview' }, 'Go to the overview'), '.'));
  }
}

function takeFlash() {
  const f = state.flash;
  state.flash = null;
  return f ? messageBox(f.text, f.kind, f.kind === 'error' ? 'page-error' : 'page-message') : null;
}

// ---------------------------------------------------------------- sign-in

function renderSignIn() {
  const flash = takeFlash();
  const textarea = h('textarea', {
    testid: 'signin-token', name: 'token', rows: '4', autocomplete: 'off', spellcheck: 'false',
    required: true, 'aria-describedby': 'signin-hint',
  });
  const error = h('p', { class: 'message message-error', role: 'alert', testid: 'signin-error', hidden: true });
  const button = h('button', { type: 'submit', testid: 'signin-submit' }, 'Sign in');
  const form = h('form', { class: 'card signin', novalidate: true },
    field('signin-token-input', 'Bearer token', textarea),
    h('p', { id: 'signin-hint', class: 'hint' },
      'The token stays in this browser tab only (session storage) and is cleared when you sign out or close the tab.'),
    error,
    h('div', { class: 'buttons' }, button));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const tok = textarea.value.trim().replace(/^Bearer\s+/i, '');
    error.hidden = true;
    if (!tok) {
      error.textContent = 'Paste a bearer token first.';
      error.hidden = false;
      textarea.focus();
      return;
    }
    button.disabled = true;
    button.textContent = 'Signing in…';
    try {
      const who = await api('GET', '/whoami', { tokenOverride: tok });
      sessionStorage.setItem(TOKEN_KEY, tok);
      state.user = who;
      state.samples = [];
      showSession();
      location.hash = '#/overview';
    } catch (err) {
      error.textContent = err.status === 401 ? `Sign-in failed: ${err.message}` : err.message;
      error.hidden = false;
      button.disabled = false;
      button.textContent = 'Sign in';
      textarea.focus();
    }
  });
  setChildren(main(), pageHeading('Sign in'), flash, form);
  textarea.focus();
}

// ---------------------------------------------------------------- overview

function recordSample(stats) {
  const now = Date.now();
  const totals = {};
  for (const t of stats?.types ?? []) {
    totals[t.type] = { succeeded: t.succeeded ?? 0, enqueued: t.enqueued ?? 0 };
  }
  state.samples.push({ t: now, totals });
  state.samples = state.samples.filter((s) => now - s.t <= RATE_WINDOW_MS);
}

/** Per minute rate of `key` for `type` over the kept samples, or null with fewer than two. */
function rate(type, key) {
  const s = state.samples;
  if (s.length < 2) return null;
  const first = s[0];
  const last = s[s.length - 1];
  const minutes = (last.t - first.t) / 60000;
  if (minutes <= 0) return null;
  const a = first.totals[type]?.[key] ?? 0;
  const b = last.totals[type]?.[key] ?? 0;
  return Math.max(0, b - a) / minutes;
}

function fmtRate(r) {
  return r === null ? '–' : r.toFixed(1);
}

async function renderOverview(gen) {
  const flash = takeFlash();
  const updated = h('p', { class: 'updated', 'aria-live': 'polite', testid: 'overview-updated' }, 'Loading…');
  const actionMsg = h('div', { id: 'overview-action-message' });
  const body = h('div', { testid: 'overview-body' });
  setChildren(main(), pageHeading('Overview'), flash, updated, actionMsg, body);
  focusHeading();

  const load = async () => {
    const [stats, types, health] = await Promise.allSettled([
      api('GET', '/stats'),
      api('GET', '/task-types'),
      api('GET', '/health', { acceptStatus: [503] }),
    ]);
    if (gen !== state.generation) return;
    if (stats.status === 'fulfilled') recordSample(stats.value);

    // Keep the keyboard focus where it was across the rebuild.
    const active = document.activeElement;
    const focusKey = state.restoreFocus ?? (active && body.contains(active) ? active.dataset.focusKey : undefined);
    state.restoreFocus = null;
    setChildren(body,
      typesSection(stats, types, () => load()),
      healthSection(health),
    );
    if (focusKey) body.querySelector(`[data-focus-key="${CSS.escape(focusKey)}"]`)?.focus({ preventScroll: true });
    updated.textContent = `Updated at ${hhmmss(new Date())}`;
    stopRefresh();
    state.refreshTimer = setTimeout(() => {
      if (gen === state.generation) load();
    }, REFRESH_MS);
  };

  state.overviewMessage = (text, kind) => setChildren(actionMsg,
    messageBox(text, kind, kind === 'error' ? 'action-error-message' : 'action-result-message'));
  await load();
}

function typesSection(stats, types, reload) {
  const section = h('section', { 'aria-labelledby': 'types-heading' }, h('h2', { id: 'types-heading' }, 'Task types'));
  if (stats.status === 'rejected') section.append(messageBox(`Statistics unavailable: ${stats.reason.message}`));
  if (types.status === 'rejected') section.append(messageBox(`Task types unavailable: ${types.reason.message}`));

  const byType = new Map();
  for (const t of stats.status === 'fulfilled' ? stats.value?.types ?? [] : []) byType.set(t.type, t);
  const pause = new Map();
  for (const t of types.status === 'fulfilled' ? types.value?.types ?? [] : []) pause.set(t.type, t);
  const names = [...new Set([...TASK_TYPES, ...pause.keys(), ...byType.keys()])];
  const admin = isAdmin();

  const rows = names.map((type) => {
    const s = byType.get(type);
    const bs = s?.by_status ?? {};
    const p = pause.get(type);
    let stateCell;
    if (!p) stateCell = h('td', { testid: `type-state-${type}` }, '—');
    else if (p.paused) {
      stateCell = h('td', { testid: `type-state-${type}`, 'data-paused': 'true' },
        h('span', { class: 'badge paused' }, 'Paused'),
        p.paused_by || p.paused_at ? h('small', { class: 'sub' }, ` by ${p.paused_by ?? '?'} at `, timeEl(p.paused_at)) : null);
    } else {
      stateCell = h('td', { testid: `type-state-${type}`, 'data-paused': 'false' }, h('span', { class: 'badge active' }, 'Active'));
    }
    const cells = [
      h('th', { scope: 'row' }, type),
      stateCell,
      h('td', { class: 'num' }, fmtNumber(bs.queued ?? 0)),
      h('td', { class: 'num' }, fmtNumber(bs.running ?? 0)),
      h('td', { class: 'num' }, fmtNumber(bs.retrying ?? 0)),
      h('td', { class: 'num' }, fmtNumber(bs.dead ?? 0)),
      h('td', { class: 'num' }, fmtNumber(bs.succeeded ?? 0)),
      h('td', { class: 'num', testid: `rate-succeeded-${type}` }, fmtRate(rate(type, 'succeeded'))),
      h('td', { class: 'num', testid: `rate-enqueued-${type}` }, fmtRate(rate(type, 'enqueued'))),
    ];
    if (admin) {
      const paused = Boolean(p?.paused);
      const btn = h('button', {
        type: 'button',
        class: paused ? '' : 'secondary',
        testid: paused ? `action-resume-${type}` : `action-pause-${type}`,
        'aria-label': `${paused ? 'Resume' : 'Pause'} ${type}`,
        'data-focus-key': `toggle-${type}`,
      }, paused ? 'Resume' : 'Pause');
      btn.disabled = !p;
      btn.addEventListener('click', async () => {
        state.restoreFocus = `toggle-${type}`;
        btn.disabled = true;
        try {
          await api('POST', `/task-types/${encodeURIComponent(type)}/${paused ? 'resume' : 'pause'}`);
          state.overviewMessage?.(`${type} ${paused ? 'resumed' : 'paused'}.`, 'ok');
        } catch (err) {
          state.overviewMessage?.(`Could not ${paused ? 'resume' : 'pause'} ${type}: ${err.message}`, 'error');
        }
        await reload();
      });
      cells.push(h('td', {}, btn));
    }
    return h('tr', { testid: `type-row-${type}`, 'data-type': type }, cells);
  });

  const headers = ['Type', 'State', 'Queued', 'Running', 'Retrying', 'Dead', 'Succeeded', 'Succeeded/min', 'Enqueued/min'];
  if (admin) headers.push('Actions');
  section.append(tableWrap('Tasks by type and status; rates over the last 5 minutes of this page', headers, rows, { testid: 'types-table' }));
  if (stats.status === 'fulfilled' && typeof stats.value?.projected_through === 'number') {
    section.append(h('p', { class: 'hint' }, `Statistics projected through event ${fmtNumber(stats.value.projected_through)}.`));
  }
  return section;
}

function kv(pairs, testid) {
  return h('dl', { class: 'kv', testid }, pairs.map(([k, v, id]) => [h('dt', {}, k), h('dd', { testid: id }, v)]));
}

function healthSection(health) {
  const section = h('section', { 'aria-labelledby': 'health-heading' }, h('h2', { id: 'health-heading' }, 'Service health'));
  if (health.status === 'rejected') {
    section.append(messageBox(`Health unavailable: ${health.reason.message}`));
    return section;
  }
  const hl = health.value ?? {};
  const healthy = hl.status === 'healthy';
  section.append(h('p', {},
    'Status: ', h('span', { class: `badge ${healthy ? 'active' : 'paused'}`, testid: 'health-status' }, hl.status ?? 'unknown'),
    ' · Database: ', h('span', { testid: 'health-database' }, hl.database ?? '—'),
    ' · Redis: ', h('span', { testid: 'health-redis' }, typeof hl.redis === 'string' ? hl.redis : JSON.stringify(hl.redis ?? '—'))));

  const grid = h('div', { class: 'grid' });
  const w = hl.workers ?? {};
  const processes = Array.isArray(w.processes) ? w.processes : [];
  grid.append(h('div', { class: 'card' }, h('h3', {}, 'Workers'),
    kv([
      ['Live processes', fmtNumber(processes.length), 'workers-processes'],
      ['Active workers', fmtNumber(w.active_workers), 'workers-active'],
      ['Tasks processed', fmtNumber(w.tasks_processed)],
      ['Tasks failed', fmtNumber(w.tasks_failed)],
    ], 'workers-card'),
    processes.length ? h('ul', { class: 'plain' }, processes.map((p) => h('li', {},
      h('code', {}, String(p.process)), ` — ${fmtNumber(p.workers)} worker${p.workers === 1 ? '' : 's'}`))) : null));

  const q = hl.queues;
  grid.append(h('div', { class: 'card' }, h('h3', {}, 'Queue depths'),
    q ? kv([['Waiting', fmtNumber(q.tasks), 'queue-tasks'], ['Processing', fmtNumber(q.processing), 'queue-processing'], ['Failed', fmtNumber(q.failed), 'queue-failed']], 'queues-card')
      : h('p', { class: 'hint' }, 'Not reported.')));

  const o = hl.outbox;
  grid.append(h('div', { class: 'card' }, h('h3', {}, 'Outbox'),
    o ? kv([['Backlog', fmtNumber(o.backlog), 'outbox-backlog'], ['Oldest due', fmtSeconds(o.oldest_due_age_seconds), 'outbox-oldest']], 'outbox-card')
      : h('p', { class: 'hint' }, 'Not reported.')));

  const ch = hl.channels && typeof hl.channels === 'object' ? Object.entries(hl.channels) : [];
  grid.append(h('div', { class: 'card' }, h('h3', {}, 'Channels'),
    ch.length ? kv(ch.map(([k, v]) => [k, typeof v === 'string' ? v : JSON.stringify(v)]), 'channels-card') : h('p', { class: 'hint' }, 'Not reported.')));

  const deps = hl.dependencies && typeof hl.dependencies === 'object' ? Object.entries(hl.dependencies) : [];
  if (deps.length) {
    grid.append(h('div', { class: 'card' }, h('h3', {}, 'Dependencies'),
      kv(deps.map(([k, v]) => [k, depText(v)]), 'dependencies-card')));
  }
  section.append(grid);

  const projectors = Array.isArray(hl.projectors) ? hl.projectors : [];
  section.append(tableWrap('Projectors', ['Projector', 'Position', 'Events', 'Lag', 'Updated'],
    projectors.length ? projectors.map((p) => h('tr', { testid: `projector-${p.name}` },
      h('th', { scope: 'row' }, p.name ?? '?'),
      h('td', { class: 'num' }, fmtNumber(p.position)),
      h('td', { class: 'num' }, fmtNumber(p.events)),
      h('td', { class: 'num', testid: `projector-lag-${p.name}` }, fmtSeconds(p.lag_seconds)),
      h('td', {}, timeEl(p.updated_at))))
      : h('tr', {}, h('td', { colspan: '5' }, 'No projectors reported.')),
    { testid: 'projectors-table' }));
  return section;
}

function depText(v) {
  if (v === null || v === undefined) return '—';
  if (typeof v !== 'object') return String(v);
  if (typeof v.latency_ms === 'number') return `${v.status}, ${v.latency_ms.toFixed(1)} ms`;
  return typeof v.status === 'string' ? v.status : JSON.stringify(v);
}

// ---------------------------------------------------------------- tasks

function renderTasks(gen) {
  const flash = takeFlash();
  const f = state.tasks.filter;
  const typeSel = selectEl('tasks-filter-type', TASK_TYPES, f.type, 'Any type');
  const statusSel = selectEl('tasks-filter-status', STATUSES, f.status, 'Any status');
  const from = h('input', { type: 'datetime-local', testid: 'tasks-filter-from', name: 'created_from', value: f.fromLocal ?? '' });
  const to = h('input', { type: 'datetime-local', testid: 'tasks-filter-to', name: 'created_to', value: f.toLocal ?? '' });
  const key = h('input', { type: 'text', testid: 'tasks-filter-key', name: 'idempotency_key', value: f.key ?? '', autocomplete: 'off' });
  const filterForm = h('form', { class: 'card filters', 'aria-label': 'Filter tasks', testid: 'tasks-filter-form' },
    h('div', { class: 'fields' },
      field('tasks-type', 'Type', typeSel),
      field('tasks-status', 'Status', statusSel),
      field('tasks-from', 'Created from', from),
      field('tasks-to', 'Created to', to),
      field('tasks-key', 'Idempotency key', key)),
    h('div', { class: 'buttons' },
      h('button', { type: 'submit', testid: 'tasks-apply' }, 'Apply filters'),
      h('button', { type: 'reset', class: 'secondary', testid: 'tasks-reset' }, 'Clear')));
  filterForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.tasks.filter = {
      type: typeSel.value || undefined,
      status: statusSel.value || undefined,
      fromLocal: from.value || undefined,
      toLocal: to.value || undefined,
      key: key.value.trim() || undefined,
    };
    state.tasks.pages = [null];
    state.tasks.page = 0;
    loadTasks(gen, list);
  });
  filterForm.addEventListener('reset', () => {
    state.tasks.filter = {};
    state.tasks.pages = [null];
    state.tasks.page = 0;
    setTimeout(() => loadTasks(gen, list), 0);
  });

  const idInput = h('input', { type: 'text', testid: 'find-task-id', name: 'id', autocomplete: 'off', spellcheck: 'false', placeholder: '00000000-0000-0000-0000-000000000000' });
  const findError = h('p', { class: 'message message-error', role: 'alert', testid: 'find-task-error', hidden: true });
  const findForm = h('form', { class: 'card find', 'aria-label': 'Find task by id', testid: 'find-task-form' },
    h('div', { class: 'fields' }, field('find-id', 'Find task by id', idInput)),
    findError,
    h('div', { class: 'buttons' }, h('button', { type: 'submit', testid: 'find-task-submit' }, 'Open task')));
  findForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const id = idInput.value.trim();
    if (!id) {
      findError.textContent = 'Enter a task id.';
      findError.hidden = false;
      idInput.focus();
      return;
    }
    location.hash = `#/tasks/${encodeURIComponent(id)}`;
  });

  const list = h('section', { 'aria-labelledby': 'tasks-list-heading', testid: 'tasks-list' });
  setChildren(main(), pageHeading('Tasks'), flash, findForm, filterForm, list);
  focusHeading();
  loadTasks(gen, list);
}

async function loadTasks(gen, list) {
  const f = state.tasks.filter;
  const after = state.tasks.pages[state.tasks.page];
  const heading = h('h2', { id: 'tasks-list-heading' }, 'Results');
  setChildren(list, heading, h('p', { class: 'loading', testid: 'tasks-loading' }, 'Loading…'));
  list.setAttribute('aria-busy', 'true');
  let data;
  try {
    data = await api('GET', `/tasks${query({
      type: f.type,
      status: f.status,
      created_from: localInputToIso(f.fromLocal),
      created_to: localInputToIso(f.toLocal),
      idempotency_key: f.key,
      after: after ?? undefined,
      limit: TASKS_PAGE_LIMIT,
    })}`);
  } catch (err) {
    if (gen !== state.generation) return;
    list.removeAttribute('aria-busy');
    setChildren(list, heading, messageBox(err.message, 'error', 'tasks-error'));
    return;
  }
  if (gen !== state.generation) return;
  list.removeAttribute('aria-busy');
  const items = Array.isArray(data?.items) ? data.items : [];
  const rows = items.length ? items.map((t) => h('tr', { testid: 'task-row', 'data-task-id': t.id },
    h('td', {}, h('a', { href: `#/tasks/${encodeURIComponent(t.id)}`, class: 'mono', testid: 'task-link' }, t.id)),
    h('td', {}, t.type),
    h('td', {}, statusBadge(t.status)),
    h('td', { class: 'num' }, `${t.attempts}/${t.max_attempts}`),
    h('td', {}, timeEl(t.created_at)),
    h('td', {}, timeEl(t.updated_at)),
    h('td', { class: 'error-text' }, t.last_error ?? '')))
    : h('tr', {}, h('td', { colspan: '7', testid: 'tasks-empty' }, 'No tasks match these filters.'));

  const pager = h('div', { class: 'buttons pager' });
  if (state.tasks.page > 0) {
    pager.append(h('button', {
      type: 'button', class: 'secondary', testid: 'tasks-prev',
      onclick: () => { state.tasks.page -= 1; loadTasks(gen, list); },
    }, 'Previous page'));
  }
  if (typeof data?.next_after === 'number') {
    pager.append(h('button', {
      type: 'button', testid: 'tasks-next',
      onclick: () => {
        state.tasks.pages[state.tasks.page + 1] = data.next_after;
        state.tasks.pages.length = state.tasks.page + 2;
        state.tasks.page += 1;
        loadTasks(gen, list);
      },
    }, 'Next page'));
  }
  setChildren(list, heading,
    h('p', { class: 'hint', 'aria-live': 'polite', testid: 'tasks-count' }, `Page ${state.tasks.page + 1}: ${items.length} task${items.length === 1 ? '' : 's'}.`),
    tableWrap('Tasks', ['ID', 'Type', 'Status', 'Attempts', 'Created', 'Updated', 'Last error'], rows, { testid: 'tasks-table' }),
    pager);
}

// ---------------------------------------------------------------- task timeline

function eventSummary(ev) {
  const d = ev.data && typeof ev.data === 'object' ? ev.data : {};
  const parts = [];
  const add = (label, value) => {
    if (value !== undefined && value !== null && value !== '') parts.push([label, value]);
  };
  switch (ev.type) {
    case 'enqueued':
      add('Max attempts', d.max_attempts);
      add('Run at', d.run_at ? fmtTime(d.run_at) : undefined);
      add('Idempotency key', d.idempotency_key);
      add('Owner', d.owner);
      break;
    case 'dispatched':
      add('Attempt', d.attempt);
      break;
    case 'attempt_started':
      add('Attempt', d.attempt);
      add('Worker', d.worker_id);
      add('Lease until', d.lease_expires_at ? fmtTime(d.lease_expires_at) : undefined);
      break;
    case 'attempt_succeeded':
      add('Attempt', d.attempt);
      add('Duration', fmtDuration(d.duration_ms));
      break;
    case 'attempt_failed':
      add('Attempt', d.attempt);
      add('Duration', fmtDuration(d.duration_ms));
      add('Kind', d.kind);
      add('Error', d.error);
      break;
    case 'retry_scheduled':
      add('Next attempt', d.next_attempt);
      add('Delay', fmtDuration(d.delay_ms));
      add('Available at', d.available_at ? fmtTime(d.available_at) : undefined);
      break;
    case 'attempt_released':
      add('Attempt', d.attempt);
      add('Reason', d.reason);
      break;
    case 'attempt_stopped':
      add('Attempt', d.attempt);
      add('Worker', d.worker_id);
      add('Reason', d.reason);
      break;
    case 'dead_lettered':
      add('Reason', d.reason);
      break;
    case 'requeued':
      add('By', d.by);
      add('New max attempts', d.max_attempts);
      break;
    case 'cancelled':
    case 'erased':
      add('By', d.by);
      add('Reason', d.reason);
      break;
    default:
      break;
  }
  return parts;
}

async function renderTimeline(gen, id) {
  const flash = takeFlash();
  setChildren(main(), pageHeading('Task'), flash, h('p', { class: 'loading' }, 'Loading…'));
  focusHeading();
  const enc = encodeURIComponent(id);
  const [taskR, eventsR, verifyR] = await Promise.allSettled([
    api('GET', `/tasks/${enc}`),
    api('GET', `/tasks/${enc}/events`),
    api('GET', `/tasks/${enc}/verify`),
  ]);
  if (gen !== state.generation) return;

  const back = h('p', {}, h('a', { href: '#/tasks' }, '← Back to tasks'));
  if (taskR.status === 'rejected') {
    const err = taskR.reason;
    const text = err.status === 404 ? `No task with id “${id}”.` : err.message;
    setChildren(main(), pageHeading('Task'), back, messageBox(text, 'error', 'timeline-error'));
    focusHeading();
    return;
  }
  const t = taskR.value;
  const heading = h('h1', { tabindex: '-1', testid: 'page-title' }, 'Task ', h('span', { class: 'mono' }, t.id));

  const fields = h('section', { 'aria-labelledby': 'task-fields-heading', class: 'card' },
    h('h2', { id: 'task-fields-heading' }, 'Details'),
    kv([
      ['ID', h('span', { class: 'mono' }, t.id), 'task-id'],
      ['Type', t.type, 'task-type'],
      ['Status', statusBadge(t.status), 'task-status'],
      ['Attempts', `${t.attempts}/${t.max_attempts}`, 'task-attempts'],
      ['Owner', t.owner ?? '—'],
      ['Run at', timeEl(t.run_at)],
      ['Idempotency key', t.idempotency_key ?? '—'],
      ['Last error', t.last_error ?? '—', 'task-last-error'],
      ['Version', String(t.version ?? '—')],
      ['Lease expires', timeEl(t.lease_expires_at)],
      ['Created', timeEl(t.created_at)],
      ['Updated', timeEl(t.updated_at)],
    ], 'task-fields'),
    h('h3', {}, 'Payload'),
    h('pre', { class: 'json', testid: 'task-payload', tabindex: '0' }, JSON.stringify(t.payload, null, 2)));

  const actionMsg = h('div', {});
  let actions = null;
  if (isAdmin()) {
    const buttons = [];
    if (t.status === 'dead') {
      const retry = h('button', { type: 'button', testid: 'action-retry' }, 'Retry');
      retry.addEventListener('click', async () => {
        retry.disabled = true;
        try {
          await api('POST', `/tasks/${enc}/retry`);
          state.flash = { text: 'Task retried: it has a new attempt.', kind: 'ok' };
          route();
        } catch (err) {
          setChildren(actionMsg, messageBox(`Retry failed: ${err.message}`, 'error', 'action-error-message'));
          retry.disabled = false;
        }
      });
      buttons.push(retry);
    }
    if (t.status !== 'succeeded' && t.status !== 'cancelled') {
      const discard = t.status === 'dead';
      const cancel = h('button', { type: 'button', class: 'danger', testid: 'action-cancel' }, discard ? 'Cancel (discard)' : 'Cancel');
      cancel.addEventListener('click', async () => {
        const answer = await confirmDialog({
          title: discard ? 'Discard this dead task?' : 'Cancel this task?',
          message: `Task ${t.id} (${t.type}) will be cancelled and will not run again.`,
          confirmLabel: 'Cancel task',
          withReason: true,
        });
        if (!answer.ok) return;
        cancel.disabled = true;
        try {
          await api('POST', `/tasks/${enc}/cancel${query({ reason: answer.reason })}`);
          state.flash = { text: 'Task cancelled.', kind: 'ok' };
          route();
        } catch (err) {
          setChildren(actionMsg, messageBox(`Cancel failed: ${err.message}`, 'error', 'action-error-message'));
          cancel.disabled = false;
        }
      });
      buttons.push(cancel);
    }
    if (buttons.length) actions = h('div', { class: 'buttons', role: 'group', 'aria-label': 'Task actions' }, buttons);
  }

  let verdict;
  if (verifyR.status === 'rejected') {
    verdict = messageBox(`Could not verify the hash chain: ${verifyR.reason.message}`, 'error', 'chain-verdict');
  } else if (verifyR.value?.ok) {
    verdict = h('p', { class: 'verdict verdict-ok', testid: 'chain-verdict', 'data-ok': 'true', role: 'status' },
      `Hash chain intact (${verifyR.value.events} events)`);
  } else {
    verdict = h('p', { class: 'verdict verdict-broken', testid: 'chain-verdict', 'data-ok': 'false', role: 'alert' },
      `Hash chain BROKEN: ${verifyR.value?.problem ?? 'unknown problem'}`);
  }

  const eventsSection = h('section', { 'aria-labelledby': 'events-heading' }, h('h2', { id: 'events-heading' }, 'Events'), verdict);
  if (eventsR.status === 'rejected') {
    eventsSection.append(messageBox(`Events unavailable: ${eventsR.reason.message}`));
  } else {
    const events = [...(Array.isArray(eventsR.value) ? eventsR.value : [])].sort((a, b) => a.sequence - b.sequence);
    eventsSection.append(h('ol', { class: 'timeline', testid: 'event-list' }, events.map((ev) => {
      const summary = eventSummary(ev);
      return h('li', { testid: 'event', 'data-event-type': ev.type, 'data-sequence': ev.sequence, class: `event event-${String(ev.type).replace(/[^a-z_]/g, '')}` },
        h('div', { class: 'event-head' },
          h('span', { class: 'seq' }, `#${ev.sequence}`), ' ',
          h('strong', { class: 'event-type', testid: 'event-type' }, ev.type), ' ',
          h('time', { datetime: ev.occurred_at, title: ev.occurred_at }, fmtTime(ev.occurred_at))),
        summary.length ? h('dl', { class: 'kv compact' }, summary.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])) : null,
        h('details', {},
          h('summary', {}, 'Full data'),
          h('pre', { class: 'json' }, JSON.stringify(ev.data, null, 2)),
          h('p', { class: 'hint' }, `Position ${ev.position} · version ${ev.version} · recorded `, timeEl(ev.recorded_at)),
          h('p', { class: 'hint mono hash' }, `hash ${ev.hash ?? '—'}`),
          ev.prev_hash ? h('p', { class: 'hint mono hash' }, `prev ${ev.prev_hash}`) : null));
    })));
  }

  setChildren(main(), heading, back, flash, actionMsg, actions, fields, eventsSection);
  focusHeading();
}

// ---------------------------------------------------------------- schedules

/** Pause or resume button of a schedule (admins only); reloads the page when done. */
function schedulePauseButton(s, messageArea) {
  if (!isAdmin()) return null;
  const action = s.paused ? 'resume' : 'pause';
  const button = h('button', { type: 'button', class: s.paused ? '' : 'secondary', testid: `action-schedule-${action}`, 'data-schedule': s.id },
    s.paused ? 'Resume' : 'Pause');
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      await api('POST', `/schedules/${encodeURIComponent(s.id)}/${action}`);
      state.flash = { text: `Schedule “${s.name}” ${s.paused ? 'resumed' : 'paused'}.`, kind: 'ok' };
      route();
    } catch (err) {
      setChildren(messageArea, messageBox(`${action} failed: ${err.message}`, 'error', 'action-error-message'));
      button.disabled = false;
    }
  });
  return button;
}

async function renderSchedules(gen) {
  const flash = takeFlash();
  setChildren(main(), pageHeading('Schedules'), flash, h('p', { class: 'loading' }, 'Loading…'));
  focusHeading();
  const messageArea = h('div', {});
  let schedules = [];
  try {
    let after;
    do {
      const page = await api('GET', `/schedules${query({ limit: 500, after })}`);
      schedules = schedules.concat(page.schedules);
      after = page.next_after;
    } while (after && schedules.length < 2000 && gen === state.generation);
  } catch (err) {
    if (gen !== state.generation) return;
    setChildren(main(), pageHeading('Schedules'), flash, messageBox(`Schedules unavailable: ${err.message}`));
    return;
  }
  if (gen !== state.generation) return;
  const rows = schedules.map((s) => h('tr', { testid: 'schedule-row', 'data-schedule': s.id },
    h('td', {}, h('a', { href: `#/schedules/${encodeURIComponent(s.id)}`, testid: 'schedule-link' }, s.name)),
    h('td', { class: 'mono' }, s.cron),
    h('td', {}, s.time_zone),
    h('td', {}, s.type),
    h('td', { testid: 'schedule-next' }, s.paused ? h('span', { class: 'badge', 'data-paused': 'true' }, 'paused') : timeEl(s.next_run_at)),
    h('td', {}, timeEl(s.last_run_at)),
    h('td', {}, schedulePauseButton(s, messageArea))));
  setChildren(main(), pageHeading('Schedules'), flash, messageArea,
    schedules.length
      ? tableWrap('Schedules', ['Name', 'Cron', 'Time zone', 'Type', 'Next run', 'Last run', ''], rows, { testid: 'schedule-table' })
      : h('p', { testid: 'schedule-empty' }, 'No schedules. Create one with POST /schedules (see /docs).'));
  focusHeading();
}

async function renderSchedule(gen, id) {
  const flash = takeFlash();
  setChildren(main(), pageHeading('Schedule'), flash, h('p', { class: 'loading' }, 'Loading…'));
  focusHeading();
  const enc = encodeURIComponent(id);
  const [scheduleR, eventsR] = await Promise.allSettled([
    api('GET', `/schedules/${enc}`),
    api('GET', `/schedules/${enc}/events`),
  ]);
  if (gen !== state.generation) return;
  const back = h('p', {}, h('a', { href: '#/schedules' }, '← Back to schedules'));
  const events = eventsR.status === 'fulfilled' && Array.isArray(eventsR.value) ? eventsR.value : [];
  const eventsSection = h('section', { 'aria-labelledby': 'schedule-events-heading' },
    h('h2', { id: 'schedule-events-heading' }, 'Change log'),
    eventsR.status === 'rejected' && eventsR.reason.status !== 404 ? messageBox(`Change log unavailable: ${eventsR.reason.message}`) : null,
    h('ol', { class: 'timeline', testid: 'schedule-event-list' }, events.map((ev) => h('li', { testid: 'schedule-event', 'data-event-type': ev.type, class: 'event' },
      h('div', { class: 'event-head' },
        h('span', { class: 'seq' }, `#${ev.sequence}`), ' ',
        h('strong', { class: 'event-type' }, ev.type), ' ',
        h('time', { datetime: ev.occurred_at, title: ev.occurred_at }, fmtTime(ev.occurred_at))),
      h('details', {},
        h('summary', {}, 'Data'),
        h('pre', { class: 'json' }, JSON.stringify(ev.data, null, 2)),
        h('p', { class: 'hint mono hash' }, `hash ${ev.hash}`))))));
  if (scheduleR.status === 'rejected') {
    const err = scheduleR.reason;
    const text = err.status === 404 ? `No schedule with id “${id}” (it may have been deleted).` : err.message;
    setChildren(main(), pageHeading('Schedule'), back, messageBox(text, 'error', 'schedule-error'), events.length ? eventsSection : null);
    focusHeading();
    return;
  }
  const s = scheduleR.value;
  const messageArea = h('div', {});
  const pause = schedulePauseButton(s, messageArea);
  const details = h('section', { 'aria-labelledby': 'schedule-fields-heading', class: 'card' },
    h('h2', { id: 'schedule-fields-heading' }, 'Details'),
    kv([
      ['ID', h('span', { class: 'mono' }, s.id)],
      ['Cron', h('span', { class: 'mono' }, s.cron), 'schedule-cron'],
      ['Time zone', s.time_zone],
      ['Type', s.type],
      ['Attempts per task', String(s.max_attempts)],
      ['Missed slots', s.missed_runs === 'catch_up' ? `catch up (the last ${s.catch_up_limit})` : 'skip'],
      ['State', s.paused ? 'paused' : 'active', 'schedule-state'],
      ['Owner', s.owner],
      ['Created', timeEl(s.created_at)],
      ['Updated', timeEl(s.updated_at)],
    ], 'schedule-fields'),
    h('h3', {}, 'Payload'),
    h('pre', { class: 'json', tabindex: '0' }, JSON.stringify(s.payload, null, 2)));
  const next = h('section', { 'aria-labelledby': 'schedule-next-heading' },
    h('h2', { id: 'schedule-next-heading' }, 'Next runs'),
    s.next_runs.length
      ? h('ol', { testid: 'schedule-next-runs' }, s.next_runs.map((t) => h('li', {}, timeEl(t))))
      : h('p', {}, s.paused ? 'Paused: no run is planned.' : 'The expression matches no later time.'));
  const runs = s.recent_runs ?? [];
  const past = h('section', { 'aria-labelledby': 'schedule-runs-heading' },
    h('h2', { id: 'schedule-runs-heading' }, 'Past slots'),
    runs.length
      ? tableWrap('Past slots', ['Slot', 'Task', 'Status'], runs.map((r) => h('tr', { testid: 'schedule-run' },
        h('td', {}, timeEl(r.slot)),
        h('td', {}, h('a', { href: `#/tasks/${encodeURIComponent(r.task_id)}`, class: 'mono' }, r.task_id)),
        h('td', {}, r.status ? statusBadge(r.status) : '—'))))
      : h('p', { testid: 'schedule-no-runs' }, 'No slot has fired yet.'));
  setChildren(main(), h('h1', { tabindex: '-1', testid: 'page-title' }, 'Schedule ', s.name), back, flash, messageArea,
    pause ? h('div', { class: 'buttons' }, pause) : null, details, next, past, eventsSection);
  focusHeading();
}

// ---------------------------------------------------------------- dead letters

function renderDead(gen) {
  const flash = takeFlash();
  const f = state.dead.filter;
  const typeSel = selectEl('dead-filter-type', TASK_TYPES, f.type, 'Any type');
  const reason = h('input', { type: 'text', testid: 'dead-filter-reason', name: 'reason', value: f.reason ?? '', autocomplete: 'off' });
  const from = h('input', { type: 'datetime-local', testid: 'dead-filter-from', name: 'failed_from', value: f.fromLocal ?? '' });
  const to = h('input', { type: 'datetime-local', testid: 'dead-filter-to', name: 'failed_to', value: f.toLocal ?? '' });
  const readForm = () => ({
    type: typeSel.value || undefined,
    reason: reason.value.trim() || undefined,
    fromLocal: from.value || undefined,
    toLocal: to.value || undefined,
  });
  const form = h('form', { class: 'card filters', 'aria-label': 'Filter dead letters', testid: 'dead-filter-form' },
    h('div', { class: 'fields' },
      field('dead-type', 'Type', typeSel),
      field('dead-reason', 'Reason contains', reason),
      field('dead-from', 'Failed from', from),
      field('dead-to', 'Failed to', to)),
    h('div', { class: 'buttons' },
      h('button', { type: 'submit', testid: 'dead-apply' }, 'Apply filters'),
      h('button', { type: 'reset', class: 'secondary', testid: 'dead-reset' }, 'Clear')));
  const resultArea = h('div', { 'aria-live': 'polite', testid: 'dead-messages' });
  const list = h('section', { 'aria-labelledby': 'dead-list-heading' });

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.dead.filter = readForm();
    loadDead(gen, list, resultArea);
  });
  form.addEventListener('reset', () => {
    state.dead.filter = {};
    setTimeout(() => loadDead(gen, list, resultArea), 0);
  });

  let bulk = null;
  if (isAdmin()) {
    const bulkAction = async (kind, btn) => {
      // Act on what the form shows now, and show the list for the same filter.
      state.dead.filter = readForm();
      const fl = state.dead.filter;
      const body = {
        type: fl.type,
        reason: fl.reason,
        failed_from: localInputToIso(fl.fromLocal),
        failed_to: localInputToIso(fl.toLocal),
      };
      for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
      const path = kind === 'retry' ? '/dead-letters/retry' : '/dead-letters/cancel';
      const verb = kind === 'retry' ? 'retried' : 'discarded';
      btn.disabled = true;
      try {
        const preview = await api('POST', path, { body: { ...body, dry_run: true } });
        const n = preview?.matched ?? 0;
        if (n === 0) {
          setChildren(resultArea, messageBox('No dead letters match these filters; nothing to do.', 'ok', 'bulk-result'));
          return;
        }
        const answer = await confirmDialog({
          title: kind === 'retry' ? 'Retry matching dead letters?' : 'Discard matching dead letters?',
          message: `${n} dead letter${n === 1 ? '' : 's'} match${n === 1 ? 'es' : ''} ${describeFilter(fl)}. `
            + (kind === 'retry' ? 'Each gets a new attempt.' : 'Each will be cancelled and will not run again.'),
          confirmLabel: kind === 'retry' ? `Retry ${n}` : `Discard ${n}`,
        });
        if (!answer.ok) {
          setChildren(resultArea, messageBox('Nothing was changed.', 'ok', 'bulk-result'));
          return;
        }
        const done = await api('POST', path, { body: { ...body, dry_run: false } });
        setChildren(resultArea, messageBox(`${done?.changed ?? 0} ${verb} (${done?.matched ?? 0} matched).`, 'ok', 'bulk-result'));
      } catch (err) {
        setChildren(resultArea, messageBox(`Bulk ${kind === 'retry' ? 'retry' : 'discard'} failed: ${err.message}`, 'error', 'bulk-result'));
      } finally {
        btn.disabled = false;
      }
      await loadDead(gen, list, resultArea, true);
    };
    const retryAll = h('button', { type: 'button', testid: 'action-bulk-retry' }, 'Retry all matching…');
    const discardAll = h('button', { type: 'button', class: 'danger', testid: 'action-bulk-discard' }, 'Discard all matching…');
    retryAll.addEventListener('click', () => bulkAction('retry', retryAll));
    discardAll.addEventListener('click', () => bulkAction('discard', discardAll));
    bulk = h('div', { class: 'buttons', role: 'group', 'aria-label': 'Bulk actions on the dead letters matching the filters' }, retryAll, discardAll);
  }

  setChildren(main(), pageHeading('Dead letters'), flash, form, bulk, resultArea, list);
  focusHeading();
  loadDead(gen, list, resultArea);
}

function describeFilter(f) {
  const parts = [];
  if (f.type) parts.push(`type ${f.type}`);
  if (f.reason) parts.push(`reason containing “${f.reason}”`);
  if (f.fromLocal) parts.push(`failed from ${fmtTime(localInputToIso(f.fromLocal))}`);
  if (f.toLocal) parts.push(`failed before ${fmtTime(localInputToIso(f.toLocal))}`);
  return parts.length ? `(${parts.join(', ')})` : '(all dead letters)';
}

async function fetchDead(type) {
  const items = [];
  let after;
  let more = false;
  for (let page = 0; page < DEAD_MAX_PAGES; page += 1) {
    const data = await api('GET', `/tasks${query({ status: 'dead', type, after, limit: DEAD_PAGE_LIMIT })}`);
    items.push(...(Array.isArray(data?.items) ? data.items : []));
    if (typeof data?.next_after !== 'number') return { items, more: false };
    after = data.next_after;
    more = true;
  }
  return { items, more };
}

async function loadDead(gen, list, resultArea, keepMessages = false) {
  const f = state.dead.filter;
  const heading = h('h2', { id: 'dead-list-heading' }, 'Dead tasks');
  if (!keepMessages) setChildren(resultArea);
  list.setAttribute('aria-busy', 'true');
  setChildren(list, heading, h('p', { class: 'loading', testid: 'dead-loading' }, 'Loading…'));
  let res;
  try {
    res = await fetchDead(f.type);
  } catch (err) {
    if (gen !== state.generation) return;
    list.removeAttribute('aria-busy');
    setChildren(list, heading, messageBox(err.message, 'error', 'dead-error'));
    return;
  }
  if (gen !== state.generation) return;
  list.removeAttribute('aria-busy');
  const needle = f.reason?.toLowerCase();
  const fromMs = f.fromLocal ? new Date(f.fromLocal).getTime() : null;
  const toMs = f.toLocal ? new Date(f.toLocal).getTime() : null;
  const shown = res.items.filter((t) => {
    if (needle && !(t.last_error ?? '').toLowerCase().includes(needle)) return false;
    const at = new Date(t.updated_at).getTime();
    if (fromMs !== null && !(at >= fromMs)) return false;
    if (toMs !== null && !(at < toMs)) return false;
    return true;
  });

  const admin = isAdmin();
  const rows = shown.length ? shown.map((t) => {
    const cells = [
      h('td', {}, h('a', { href: `#/tasks/${encodeURIComponent(t.id)}`, class: 'mono' }, t.id)),
      h('td', {}, t.type),
      h('td', { class: 'num' }, `${t.attempts}/${t.max_attempts}`),
      h('td', { class: 'error-text' }, t.last_error ?? ''),
      h('td', {}, timeEl(t.updated_at)),
    ];
    if (admin) {
      const retry = h('button', { type: 'button', testid: 'action-dead-retry', 'aria-label': `Retry task ${t.id}` }, 'Retry');
      const discard = h('button', { type: 'button', class: 'danger', testid: 'action-dead-discard', 'aria-label': `Discard task ${t.id}` }, 'Discard');
      retry.addEventListener('click', async () => {
        retry.disabled = true;
        discard.disabled = true;
        try {
          await api('POST', `/tasks/${encodeURIComponent(t.id)}/retry`);
          setChildren(resultArea, messageBox(`Task ${t.id} retried.`, 'ok', 'row-result'));
        } catch (err) {
          setChildren(resultArea, messageBox(`Retry of ${t.id} failed: ${err.message}`, 'error', 'row-result'));
        }
        await loadDead(gen, list, resultArea, true);
      });
      discard.addEventListener('click', async () => {
        const answer = await confirmDialog({
          title: 'Discard this dead letter?',
          message: `Task ${t.id} (${t.type}) will be cancelled and will not run again.`,
          confirmLabel: 'Discard',
          withReason: true,
        });
        if (!answer.ok) return;
        retry.disabled = true;
        discard.disabled = true;
        try {
          await api('POST', `/tasks/${encodeURIComponent(t.id)}/cancel${query({ reason: answer.reason })}`);
          setChildren(resultArea, messageBox(`Task ${t.id} discarded.`, 'ok', 'row-result'));
        } catch (err) {
          setChildren(resultArea, messageBox(`Discard of ${t.id} failed: ${err.message}`, 'error', 'row-result'));
        }
        await loadDead(gen, list, resultArea, true);
      });
      cells.push(h('td', { class: 'actions' }, retry, ' ', discard));
    }
    return h('tr', { testid: 'dead-row', 'data-task-id': t.id }, cells);
  }) : h('tr', {}, h('td', { colspan: admin ? '6' : '5', testid: 'dead-empty' }, 'No dead letters match these filters.'));

  const headers = ['ID', 'Type', 'Attempts', 'Reason', 'Failed at'];
  if (admin) headers.push('Actions');
  setChildren(list, heading,
    h('p', { class: 'hint', testid: 'dead-count' },
      `${shown.length} dead letter${shown.length === 1 ? '' : 's'} shown`,
      res.more ? ` (only the first ${res.items.length} dead tasks were searched)` : '', '.'),
    tableWrap('Dead letters', headers, rows, { testid: 'dead-table' }));
}

// ---------------------------------------------------------------- start

document.getElementById('signout').addEventListener('click', () => signOut());
window.addEventListener('hashchange', route);
route();
