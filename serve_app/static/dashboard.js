// Operator dashboard: polls GET /stats every 2 s and renders it (an operator key when the server has keys).
// Test hooks on `window.da3dash`.
import { errorFromResponse } from './errors.js';
import { ConnectionSettings } from './settings.js';

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

const dash = { polls: 0, failures: 0, last: null, error: null };
window.da3dash = dash;
const settings = new ConnectionSettings($('server-url'), $('token'), { onChange: () => poll() });

/** Build an element: el('td', {class: 'num'}, 'text', childNode). Text is always set as text, never HTML. */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'style') e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.map((c) => (c instanceof Node ? c : String(c ?? ''))));
  return e;
}

function duration(s) {
  if (s == null || !Number.isFinite(s)) return '–';
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
}

function bytes(n) {
  if (n == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function stateClass(s) {
  const v = String(s).toUpperCase();
  if (/HEALTHY|RUNNING|COMPLETE|STREAMING|ACTIVE/.test(v)) return 'state-ok';
  if (/UNHEALTHY|FAIL|DEAD|ERROR/.test(v)) return 'state-bad';
  return 'state-warn';
}

function renderSessions(stats) {
  const rows = [...(stats.sessions || [])].sort((a, b) => b.created_at - a.created_at).map((s) => {
    const frac = s.frames_received ? s.frames_processed / s.frames_received : 0;
    return el('tr', { 'data-session-id': s.session_id },
      el('td', { class: 'mono' }, s.session_id),
      el('td', { class: stateClass(s.state) }, s.state),
      el('td', {}, el('div', { class: 'bar', title: `${(frac * 100).toFixed(0)} %` },
        el('span', { style: `width:${(frac * 100).toFixed(1)}%` }))),
      el('td', { class: 'num' }, s.frames_received),
      el('td', { class: 'num' }, s.frames_processed),
      el('td', { class: 'num' }, Number(s.points_total).toLocaleString()),
      el('td', { class: 'num' }, s.windows),
      el('td', { class: 'num' }, duration(s.age_s)),
      el('td', { class: 'num' }, duration(stats.time - s.updated_at)),
      el('td', {}, s.connected ? 'yes' : 'no'));
  });
  $('sessions').tBodies[0].replaceChildren(...(rows.length ? rows
    : [el('tr', {}, el('td', { colspan: 10, class: 'muted' }, 'no sessions'))]));
  const counts = Object.entries(stats.counts || {}).map(([k, v]) => `${k}: ${v}`).join(' · ');
  const limit = stats.limits && stats.limits.max_sessions;
  $('counts').textContent = `${counts}${limit ? ` · limit ${limit}` : ''} · workers ${stats.workers ?? '–'}`;
}

function renderHistogram(model) {
  const hist = Object.entries(model.batch_sizes || {}).map(([k, v]) => [Number(k), Number(v)])
    .sort((a, b) => a[0] - b[0]);
  const max = Math.max(1, ...hist.map(([, v]) => v));
  $('hist').replaceChildren(...(hist.length ? hist.map(([size, n]) => el('div', { class: 'hist-bar', 'data-size': size, 'data-count': n },
    el('span', { class: 'cnt' }, n),
    el('div', { class: 'fill', style: `height:${((n / max) * 100).toFixed(1)}%` }),
    el('span', { class: 'lbl' }, `×${size}`))) : [el('span', { class: 'muted' }, 'no batches yet')]));
  const b = model.batching || {};
  $('batching').textContent = Object.entries(b).map(([k, v]) => `${k} ${v}`).join(' · ');
}

function renderErrors(errors) {
  const rows = Object.entries(errors || {}).sort((a, b) => b[1] - a[1])
    .map(([code, n]) => el('tr', { 'data-code': code }, el('td', { class: 'mono' }, code), el('td', { class: 'num' }, n)));
  $('errors').tBodies[0].replaceChildren(...(rows.length ? rows
    : [el('tr', {}, el('td', { colspan: 2, class: 'muted' }, 'none'))]));
}

function renderDeployments(deps) {
  const rows = Object.entries(deps || {}).map(([name, d]) => el('tr', { 'data-deployment': name },
    el('td', {}, name),
    el('td', { class: stateClass(d.status) }, String(d.status).replace(/^DeploymentStatus\./, '')),
    el('td', {}, Object.entries(d.replicas || {}).map(([st, n]) => `${String(st).replace(/^ReplicaState\./, '')}: ${n}`)
      .join(', ') || '–')));
  $('deployments').tBodies[0].replaceChildren(...(rows.length ? rows
    : [el('tr', {}, el('td', { colspan: 3, class: 'muted' }, 'unavailable'))]));
}

function renderModel(model) {
  const info = model.info || {};
  const gpu = model.gpu_memory;
  const items = [
    ['replica', model.replica], ['model', info.model_name], ['checkpoint', info.checkpoint], ['device', info.device], ['dtype', info.dtype ?? info.amp],
    ['windows', model.windows], ['failures', model.failures],
    ['busy', model.busy_s != null ? `${Number(model.busy_s).toFixed(1)} s` : null],
    ['GPU allocated', gpu ? bytes(gpu.allocated_bytes) : 'no GPU'],
    ['GPU reserved', gpu ? bytes(gpu.reserved_bytes) : null],
    ['GPU peak', gpu ? bytes(gpu.max_allocated_bytes) : null],
    ['last error', model.last_error],
  ].filter(([, v]) => v != null && v !== '');
  $('model').tBodies[0].replaceChildren(...items.map(([k, v]) => el('tr', {}, el('th', {}, k),
    el('td', { class: 'mono' }, typeof v === 'object' ? JSON.stringify(v) : v))));
}

function render(stats) {
  const model = stats.model || {};
  $('c-uptime').textContent = duration(stats.uptime_s);
  $('c-fps').textContent = Number(stats.frames_per_s || 0).toFixed(2);
  $('c-frames').textContent = stats.frames_in ?? '–';
  $('c-sessions').textContent = (stats.sessions || []).length;
  $('c-windows').textContent = model.windows ?? '–';
  $('c-failures').textContent = model.failures ?? '–';
  $('c-gpu').textContent = model.gpu_memory ? bytes(model.gpu_memory.allocated_bytes) : 'n/a';
  renderSessions(stats);
  renderHistogram(model);
  renderErrors(stats.errors);
  renderDeployments(stats.deployments);
  renderModel(model);
  $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

let inFlight = false;
async function poll() {
  if (inFlight) return;
  inFlight = true;
  try {
    // settings.authHeaders(): no key for another origin unless the user confirmed it
    const r = await fetch(`${settings.base}/stats`, { headers: settings.authHeaders(), cache: 'no-store' });
    if (!r.ok) throw await errorFromResponse(r);
    const body = await r.json().catch(() => ({}));
    dash.last = body;
    dash.error = null;
    dash.polls += 1;
    $('dash-error').textContent = '';
    render(body);
  } catch (err) {
    dash.failures += 1;
    dash.error = err.message;
    $('dash-error').textContent = err.message;
  } finally {
    inFlight = false;
  }
}

poll();
setInterval(poll, POLL_MS);
