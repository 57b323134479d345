// da3-serve browser client: create a session, stream frames over the WebSocket (DA3F), render DA3P points live.
// Test hooks live on `window.da3` (state, streamUrls, finalize, ...); see tests/clients/test_web_client.py.
import { keyFor } from './keyguard.js';
import { decodePoints, encodeFrame, halfToFloat } from './protocol.js';
import { Viewer } from './viewer.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'da3.token';
const URL_KEY = 'da3.url';
const FLUSH_AFTER_MS = 3000; // flow control stuck this long (window larger than max_in_flight): ask for a flush

const state = {};
function resetState() {
  Object.assign(state, {
    status: 'idle', sessionId: null, params: null, maxInFlight: null, inFlight: 0,
    framesSent: 0, framesAcked: 0, framesProcessed: 0, framesFailed: 0, framesRejected: 0, framesDropped: 0,
    framesLost: 0, pointsReceived: 0, pointsRendered: 0, pointsHistory: [], windows: 0, frustums: 0, lastSeq: 0,
    lastWindow: null, errors: [], summary: null, webgl: viewer.webgl, fps: 0, latencyP50: null, reconnects: 0,
    maxOutstanding: 0, // most frames ever sent and not yet processed/rejected: flow control keeps it <= the limit
    corrections: 0, correctionVersion: 0, // `correction` records applied (global re-optimisation)
  });
}

const viewer = new Viewer($('view'));
resetState();
if (!viewer.webgl) {
  $('notice').hidden = false;
  $('notice').textContent = `WebGL is unavailable (${viewer.error}); points are still received and counted.`;
}

// --- connection settings -----------------------------------------------------------------------------------
function defaultBase() {
  return new URL('.', location.href).href.replace(/\/$/, '');
}
function baseUrl() {
  return ($('server-url').value.trim() || defaultBase()).replace(/\/$/, '');
}
function token() {
  return keyFor(baseUrl(), $('token').value.trim()); // '' for another origin unless the user confirmed it
}
function authHeaders() {
  const key = token();
  return key ? { Authorization: `Bearer ${key}` } : {};
}
{
  const q = new URLSearchParams(location.search);
  $('server-url').placeholder = defaultBase();
  $('server-url').value = q.get('url') || localStorage.getItem(URL_KEY) || '';
  $('token').value = localStorage.getItem(TOKEN_KEY) || ''; // never from the URL: URLs are logged
  $('server-url').addEventListener('change', () => localStorage.setItem(URL_KEY, $('server-url').value.trim()));
  $('token').addEventListener('change', () => localStorage.setItem(TOKEN_KEY, $('token').value.trim()));
}

// --- session state -----------------------------------------------------------------------------------------
let ws = null;
let waiters = [];
let pending = new Set(); // frame_ids sent and neither processed nor rejected: the flow-control window
let acked = new Set();
let nextFrameId = 0;
let stopRequested = false;
let clientCap = Infinity; // optional client-side limit below the server's max_in_flight
let finalizing = false;
let fatalSeen = false;
let pump = null;
let done = null; // {promise, resolve, reject} settled by summary / failure
let latencies = [];
let processedAt = [];

class ServerError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

function recordError(code, message, extra = {}) {
  state.errors.push({ code, message, fatal: false, time: Date.now(), ...extra });
  renderErrors();
}

function notify() {
  const w = waiters;
  waiters = [];
  w.forEach((fn) => fn());
  scheduleUi();
}

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => { d.resolve = resolve; d.reject = reject; });
  d.promise.catch(() => {}); // rejection is reported through state; callers may still await it
  return d;
}

function isEnded() {
  return ['complete', 'failed', 'stopped', 'idle'].includes(state.status);
}

function fail(message, code = 'CLIENT_ERROR') {
  if (state.status === 'complete') return;
  state.status = 'failed';
  if (message) recordError(code, message, { fatal: true });
  if (done) done.reject(new Error(message || 'session failed'));
  notify();
}

async function createSession(params) {
  const r = await fetch(`${baseUrl()}/ws/session/create`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', ...authHeaders() }, body: JSON.stringify(params),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = body.error || { code: `HTTP_${r.status}`, message: r.statusText };
    throw new ServerError(e.code, e.message);
  }
  return body;
}

function connect(resumeFrom) {
  return new Promise((resolve, reject) => {
    const q = new URLSearchParams();
    if (resumeFrom != null) q.set('resume_from', String(resumeFrom));
    const url = `${baseUrl().replace(/^http/, 'ws')}/ws/reconstruct/${state.sessionId}${q.size ? `?${q}` : ''}`;
    // The key rides as a subprotocol (never in the URL); the server answers with da3.v1 only.
    const key = token();
    let sock;
    try {
      sock = new WebSocket(url, key ? ['da3.v1', `bearer.${key}`] : ['da3.v1']);
    } catch (err) {
      reject(new ServerError('CLIENT_ERROR', `cannot open the stream: ${err.message} (an API key may hold only `
        + "letters, digits and !#$%&'*+-.^_`|~)"));
      return;
    }
    sock.binaryType = 'arraybuffer';
    ws = sock;
    let ready = false;
    sock.onmessage = (ev) => {
      if (sock !== ws) return;
      if (typeof ev.data !== 'string') {
        onPoints(ev.data);
        return;
      }
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (err) {
        recordError('CLIENT_DECODE', `unparseable server message: ${err.message}`);
        return;
      }
      if (msg.type === 'ready') {
        ready = true;
        onReady(msg, resumeFrom != null);
        resolve(msg);
      } else {
        onMessage(msg);
      }
    };
    sock.onclose = (ev) => {
      if (!ready) {
        const last = state.errors[state.errors.length - 1];
        reject(last && last.fatal ? new ServerError(last.code, last.message)
          : new Error(`WebSocket closed (${ev.code}) before ready`));
      }
      if (sock === ws) onClose(ev);
    };
  });
}

function onReady(msg, resumed) {
  state.maxInFlight = msg.max_in_flight;
  state.inFlight = msg.in_flight;
  if (resumed) {
    // Frames sent but never acknowledged were lost with the old connection.
    for (const id of [...pending]) {
      if (!acked.has(id)) {
        pending.delete(id);
        state.framesLost += 1;
      }
    }
    if (finalizing) send({ type: 'finalize' });
  }
  state.status = finalizing ? 'finalizing' : 'streaming';
  notify();
}

function onMessage(m) {
  switch (m.type) {
    case 'ack':
      state.framesAcked += 1;
      acked.add(m.frame_id);
      state.inFlight = m.in_flight;
      state.maxInFlight = m.max_in_flight;
      break;
    case 'error':
      state.errors.push({ code: m.code, message: m.message, fatal: m.fatal, frame_id: m.frame_id, time: Date.now() });
      if (m.frame_id != null && pending.delete(m.frame_id)) state.framesRejected += 1;
      if (m.fatal) fatalSeen = true;
      renderErrors();
      break;
    case 'progress':
      state.inFlight = m.in_flight;
      break;
    case 'window':
      state.windows += 1;
      state.lastSeq = Math.max(state.lastSeq, m.seq);
      state.lastWindow = m;
      break;
    case 'frame_result':
      onFrameResult(m);
      break;
    case 'correction':
      onCorrection(m);
      break;
    case 'summary':
      state.summary = m;
      state.status = 'complete';
      if (done) done.resolve(m);
      break;
    default:
      break; // pong and future message types
  }
  notify();
}

function onFrameResult(m) {
  state.framesProcessed += 1;
  if (m.failed) state.framesFailed += 1;
  pending.delete(m.frame_id);
  if (typeof m.latency_ms === 'number') {
    latencies.push(m.latency_ms);
    if (latencies.length > 200) latencies.shift();
    const sorted = [...latencies].sort((a, b) => a - b);
    state.latencyP50 = sorted[Math.floor(sorted.length / 2)];
  }
  const now = performance.now();
  processedAt.push(now);
  processedAt = processedAt.filter((t) => now - t <= 5000);
  state.fps = processedAt.length > 1 ? ((processedAt.length - 1) * 1000) / (now - processedAt[0]) : 0;
  if (m.pose && m.intrinsics && m.image_size) {
    const depth = m.depth && m.depth.median > 0 ? m.depth.median * 0.15 : 0.1;
    viewer.addFrustum(m.pose, m.intrinsics, m.image_size, depth, undefined, m.window ?? 0);
    state.frustums = viewer.frustumCount;
  }
}

/** Per-window absolute transforms (docs/WEBSOCKET_API.md 3.5.1): the viewer moves those windows' groups. */
function onCorrection(m) {
  if (!Array.isArray(m.transforms)) {
    recordError('CLIENT_DECODE', 'correction without transforms');
    return;
  }
  viewer.applyCorrection(m.transforms);
  state.corrections += 1;
  state.correctionVersion = Math.max(state.correctionVersion, m.version || 0);
  if (Number.isInteger(m.seq)) {
    state.lastSeq = Math.max(state.lastSeq, m.seq);
    send({ type: 'received', seq: m.seq }); // a complete record: acknowledged like a points message
  }
}

function onPoints(buffer) {
  let chunk;
  try {
    chunk = decodePoints(buffer);
  } catch (err) {
    recordError('CLIENT_DECODE', `bad points message: ${err.message}`);
    return;
  }
  viewer.addPoints(chunk.positions, chunk.colors, chunk.header.window ?? 0);
  // Result flow control: without `received` the server pauses after max_unacked_result_bytes.
  if (Number.isInteger(chunk.header.seq)) send({ type: 'received', seq: chunk.header.seq });
  state.pointsReceived += chunk.count;
  state.pointsRendered = viewer.pointCount;
  state.pointsHistory.push(state.pointsRendered);
  scheduleUi();
}

async function onClose(ev) {
  ws = null;
  if (state.status === 'complete' || state.status === 'stopped') {
    notify();
    return;
  }
  // Server-chosen 4xxx codes and fatal errors are final; a dropped connection is resumed from the last window.
  if (fatalSeen || ev.code >= 4000 || ev.code === 1000 || state.reconnects >= 3) {
    fail(fatalSeen ? null : `connection closed (${ev.code} ${ev.reason || ''})`.trim(), 'CONNECTION_CLOSED');
    return;
  }
  state.status = 'reconnecting';
  state.reconnects += 1;
  notify();
  await new Promise((r) => setTimeout(r, 1000 * state.reconnects));
  try {
    await connect(state.lastSeq);
  } catch (err) {
    fail(`reconnect failed: ${err.message}`, err.code || 'CONNECTION_CLOSED');
  }
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(typeof msg === 'string' ? msg : JSON.stringify(msg));
}

function inFlightLimit() {
  return Math.min(state.maxInFlight ?? 0, clientCap);
}

function slotFree() {
  return ws && ws.readyState === WebSocket.OPEN && pending.size < inFlightLimit();
}

/** Resolves when one more frame may be sent without exceeding max_in_flight unprocessed frames. */
async function waitForSlot() {
  let since = performance.now();
  let seen = state.framesProcessed;
  let flushed = false;
  while (!slotFree()) {
    if (stopRequested || isEnded()) throw new Error('stream stopped');
    await new Promise((r) => {
      waiters.push(r);
      setTimeout(r, 500);
    });
    if (state.framesProcessed !== seen) {
      seen = state.framesProcessed;
      since = performance.now();
      flushed = false;
    } else if (!flushed && performance.now() - since > FLUSH_AFTER_MS && pending.size) {
      send({ type: 'flush' });
      flushed = true;
    }
  }
}

// --- frame sources -----------------------------------------------------------------------------------------
const preview = $('preview');
const previewCtx = preview.getContext('2d');

/** Draw an image/video/bitmap to the preview canvas (no larger than process_res) and encode it as JPEG. */
async function encodeJpeg(image) {
  const w = image.videoWidth || image.width;
  const h = image.videoHeight || image.height;
  const limit = (state.params && state.params.process_res) || 504;
  const scale = Math.min(1, limit / Math.max(w, h));
  preview.width = Math.max(1, Math.round(w * scale));
  preview.height = Math.max(1, Math.round(h * scale));
  previewCtx.drawImage(image, 0, 0, preview.width, preview.height);
  const blob = await new Promise((r) => preview.toBlob(r, 'image/jpeg', 0.9));
  if (!blob) throw new Error('JPEG encoding failed');
  return new Uint8Array(await blob.arrayBuffer());
}

async function sendImage(image, timestamp) {
  const jpeg = await encodeJpeg(image);
  if (!slotFree()) await waitForSlot();
  const id = nextFrameId++;
  ws.send(encodeFrame(jpeg, { frame_id: id, timestamp }));
  pending.add(id);
  state.framesSent += 1;
  state.maxOutstanding = Math.max(state.maxOutstanding, pending.size);
  scheduleUi();
}

async function toBitmap(item) {
  const blob = item instanceof Blob ? item : await (await fetch(item)).blob();
  return createImageBitmap(blob);
}

/** Images (Blobs/Files or URLs, data: and blob: included), in order. */
function imageSource(items) {
  return async () => {
    for (let i = 0; i < items.length && !stopRequested; i++) {
      await waitForSlot(); // decode only when it can go out
      const bitmap = await toBitmap(items[i]);
      await sendImage(bitmap, i);
      bitmap.close();
    }
  };
}

/** A video file sampled at `fps` frames per second of video time. */
function videoSource(file, fps) {
  return async () => {
    const video = document.createElement('video');
    video.muted = true;
    video.preload = 'auto';
    video.src = URL.createObjectURL(file);
    try {
      await new Promise((resolve, reject) => {
        video.onloadeddata = resolve;
        video.onerror = () => reject(new Error(`cannot play ${file.name}`));
      });
      for (let t = 0; t < video.duration && !stopRequested; t += 1 / fps) {
        await waitForSlot();
        await new Promise((r) => {
          video.onseeked = r;
          video.currentTime = t;
        });
        await sendImage(video, t);
      }
    } finally {
      URL.revokeObjectURL(video.src);
    }
  };
}

let camStream = null;
/** The webcam at `fps`: real time, so a frame that would exceed max_in_flight is dropped, not queued. */
function webcamSource(fps) {
  return async () => {
    camStream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false });
    const video = document.createElement('video');
    video.muted = true;
    video.playsInline = true;
    video.srcObject = camStream;
    await video.play();
    const t0 = performance.now();
    try {
      while (!stopRequested && !isEnded()) {
        const tick = performance.now();
        if (slotFree()) await sendImage(video, (tick - t0) / 1000);
        else state.framesDropped += 1;
        await new Promise((r) => setTimeout(r, Math.max(0, 1000 / fps - (performance.now() - tick))));
      }
    } finally {
      camStream.getTracks().forEach((t) => t.stop());
      camStream = null;
    }
  };
}

// --- session lifecycle -------------------------------------------------------------------------------------
/** Session params from the form; an empty field leaves the server's default. */
function readParams() {
  const params = {};
  for (const [id, key] of [['process-res', 'process_res'], ['window-size', 'window_size'], ['overlap', 'overlap']]) {
    const v = $(id).value.trim();
    if (v !== '') params[key] = Number(v);
  }
  return params;
}

/** Create a session, connect, stream `source`; finalize at its end when autoFinalize. Resolves with the summary. */
async function start(source, params = readParams(), { autoFinalize = true, maxInFlight = Infinity } = {}) {
  if (state.status !== 'idle' && !isEnded()) throw new Error('a session is already running');
  if (ws) ws.close(1000);
  ws = null;
  viewer.clear();
  resetState();
  pending = new Set();
  acked = new Set();
  nextFrameId = 0;
  stopRequested = false;
  clientCap = maxInFlight > 0 ? maxInFlight : Infinity;
  finalizing = false;
  fatalSeen = false;
  latencies = [];
  processedAt = [];
  done = deferred();
  renderErrors();
  state.status = 'creating';
  notify();
  try {
    const info = await createSession(params);
    state.sessionId = info.session_id;
    state.params = info.params;
    await connect(null);
  } catch (err) {
    if (state.status !== 'failed') fail(err.message.replace(/^[A-Z_0-9]+: /, ''), err.code || 'CLIENT_ERROR');
    throw err;
  }
  pump = (async () => {
    try {
      await source();
    } catch (err) {
      if (!stopRequested && !isEnded()) recordError(err.code || 'SOURCE_ERROR', err.message);
    }
  })();
  if (autoFinalize) {
    await pump;
    if (!isEnded()) finalize();
  }
  return done.promise;
}

/** Stop the source, then ask the server to process what is left; resolves with the summary. */
async function finalize() {
  if (!done) return null;
  stopRequested = true;
  if (pump) await pump;
  if (!isEnded() && !finalizing) {
    finalizing = true;
    state.status = 'finalizing';
    send({ type: 'finalize' });
    notify();
  }
  return done.promise;
}

/** Close without finalizing; the session stays on the server (it can be resumed or exported). */
function stop() {
  stopRequested = true;
  if (!isEnded()) state.status = 'stopped';
  if (ws) ws.close(1000);
  if (done) done.reject(new Error('stopped'));
  notify();
}

/** Stream images from URLs (data:/blob:/http) and finalize; resolves with the summary. */
function streamUrls(urls, params = readParams(), options = {}) {
  return start(imageSource(urls), params, options);
}

async function downloadExport(kind = 'ply') {
  if (!state.sessionId) throw new Error('no session yet');
  const names = { ply: 'reconstruction.ply', glb: 'reconstruction.glb', trajectory: 'trajectory.json' };
  const r = await fetch(`${baseUrl()}/ws/session/${state.sessionId}/${names[kind]}`, { headers: authHeaders() });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    const e = body.error || { code: `HTTP_${r.status}`, message: r.statusText };
    recordError(e.code, e.message);
    throw new ServerError(e.code, e.message);
  }
  const blob = await r.blob();
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = `${state.sessionId}.${names[kind].split('.').pop()}`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  return blob.size;
}

// --- UI ----------------------------------------------------------------------------------------------------
let selected = null; // {kind: 'images'|'video', items}
function selectFiles(fileList) {
  const files = [...fileList];
  const video = files.find((f) => f.type.startsWith('video/'));
  if (video) {
    selected = { kind: 'video', items: [video] };
    $('source-label').textContent = `video: ${video.name}`;
  } else {
    const images = files.filter((f) => f.type.startsWith('image/'))
      .sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
    selected = images.length ? { kind: 'images', items: images } : null;
    $('source-label').textContent = images.length ? `${images.length} images` : 'no images or video in the drop';
  }
  scheduleUi();
}

$('files').addEventListener('change', (e) => selectFiles(e.target.files));
for (const ev of ['dragenter', 'dragover']) {
  document.addEventListener(ev, (e) => {
    e.preventDefault();
    $('drop').classList.add('over');
  });
}
for (const ev of ['dragleave', 'drop']) {
  document.addEventListener(ev, (e) => {
    e.preventDefault();
    $('drop').classList.remove('over');
  });
}
document.addEventListener('drop', (e) => selectFiles(e.dataTransfer.files));

const quiet = (p) => p.catch(() => {}); // failures are already shown in the error list
$('start').addEventListener('click', () => {
  if (!selected) return;
  const src = selected.kind === 'video' ? videoSource(selected.items[0], Number($('sample-fps').value))
    : imageSource(selected.items);
  quiet(start(src, readParams(), { autoFinalize: $('auto-finalize').checked }));
});
$('webcam').addEventListener('click', () => {
  quiet(start(webcamSource(Number($('sample-fps').value)), readParams(), { autoFinalize: false }));
});
$('finalize').addEventListener('click', () => quiet(finalize()));
$('stop').addEventListener('click', stop);
$('dl-ply').addEventListener('click', () => quiet(downloadExport('ply')));
$('dl-glb').addEventListener('click', () => quiet(downloadExport('glb')));
$('dl-traj').addEventListener('click', () => quiet(downloadExport('trajectory')));
$('fit').addEventListener('click', () => viewer.resetView());

let uiQueued = false;
function scheduleUi() {
  if (uiQueued) return;
  uiQueued = true;
  requestAnimationFrame(() => {
    uiQueued = false;
    renderUi();
  });
  setTimeout(() => { if (uiQueued) { uiQueued = false; renderUi(); } }, 250); // rAF pauses in hidden tabs
}

function renderUi() {
  const s = state;
  const set = (id, v) => { $(id).textContent = v; };
  set('status', s.status);
  $('status').dataset.status = s.status;
  set('session-id', s.sessionId || '–');
  set('st-sent', s.framesSent);
  set('st-acked', s.framesAcked);
  set('st-processed', s.framesProcessed);
  set('st-inflight', `${pending.size} / ${s.maxInFlight == null ? '–' : inFlightLimit()}`);
  set('st-points', s.pointsRendered.toLocaleString());
  set('st-windows', s.windows);
  set('st-fps', s.fps.toFixed(2));
  set('st-latency', s.latencyP50 == null ? '–' : `${Math.round(s.latencyP50)} ms`);
  set('st-dropped', s.framesDropped + s.framesLost + s.framesRejected);
  const t = s.lastWindow && s.lastWindow.timings_ms;
  set('st-timings', t ? `queue ${Math.round(t.queue ?? 0)} · model ${Math.round(t.model ?? 0)} · geometry `
    + `${Math.round(t.geometry ?? 0)} · total ${Math.round(t.total ?? 0)} ms` : '–');
  const progress = s.framesSent ? s.framesProcessed / s.framesSent : 0;
  $('progress').value = progress;
  const running = !isEnded() && s.status !== 'idle';
  $('start').disabled = running || !selected;
  $('webcam').disabled = running || !navigator.mediaDevices;
  $('finalize').disabled = !running || finalizing;
  $('stop').disabled = !running;
  for (const id of ['dl-ply', 'dl-glb', 'dl-traj']) $(id).disabled = !s.sessionId || !s.windows;
}

function renderErrors() {
  const list = $('errors');
  list.replaceChildren(...state.errors.slice(-20).reverse().map((e) => {
    const li = document.createElement('li');
    const code = document.createElement('code');
    code.textContent = e.code;
    li.append(code, ` ${e.message}${e.frame_id != null ? ` (frame ${e.frame_id})` : ''}`);
    if (e.fatal) li.classList.add('fatal');
    return li;
  }));
  $('error-count').textContent = state.errors.length;
}

window.da3 = {
  state, viewer, start, finalize, stop, streamUrls, downloadExport, imageSource, videoSource, webcamSource,
  protocol: { encodeFrame, decodePoints, halfToFloat },
  get pendingFrames() { return pending.size; },
};
renderUi();
