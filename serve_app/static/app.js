// da3-serve browser client page: wires the form to the modules that mirror clients/da3_client:
//   settings.js  server URL and API key (shared with the dashboard; the key goes to another origin only if confirmed)
//   client.js    HTTP: create a session, download exports          errors.js   ServerError
//   stream.js    the WebSocket: DA3F frames out, results in, flow control, resume
//   sources.js   images, a video file, the webcam                    viewer.js   three.js points, frustums, corrections
//   protocol.js  DA3F/DA3P binary framing
// Test hooks live on `window.da3` (state, streamUrls, finalize, ...); see tests/clients/test_web_client.py.
import { createSession, EXPORTS, fetchExport } from './client.js';
import { ServerError } from './errors.js';
import { decodePoints, encodeFrame, halfToFloat } from './protocol.js';
import { ConnectionSettings } from './settings.js';
import { FrameSources } from './sources.js';
import { StreamSession } from './stream.js';
import { Viewer } from './viewer.js';

const $ = (id) => document.getElementById(id);

const viewer = new Viewer($('view'));
const settings = new ConnectionSettings($('server-url'), $('token'));
const stream = new StreamSession(settings, viewer, { onChange: scheduleUi, onErrors: renderErrors });
const sources = new FrameSources($('preview'));
const { state } = stream;
if (!viewer.webgl) {
  $('notice').hidden = false;
  $('notice').textContent = `WebGL is unavailable (${viewer.error}); points are still received and counted.`;
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
  stream.begin({ maxInFlight });
  try {
    await stream.open(await createSession(settings, params));
  } catch (err) {
    stream.failStart(err);
    throw err;
  }
  return stream.run(source, autoFinalize);
}

/** Stream images from URLs (data:/blob:/http) and finalize; resolves with the summary. */
function streamUrls(urls, params = readParams(), options = {}) {
  return start(sources.images(urls), params, options);
}

async function downloadExport(kind = 'ply') {
  if (!state.sessionId) throw new Error('no session yet');
  let blob;
  try {
    blob = await fetchExport(settings, state.sessionId, kind);
  } catch (err) {
    if (err instanceof ServerError) stream.recordError(err.code, err.detail);
    throw err;
  }
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = `${state.sessionId}.${EXPORTS[kind].split('.').pop()}`;
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
  const src = selected.kind === 'video' ? sources.video(selected.items[0], Number($('sample-fps').value))
    : sources.images(selected.items);
  quiet(start(src, readParams(), { autoFinalize: $('auto-finalize').checked }));
});
$('webcam').addEventListener('click', () => {
  quiet(start(sources.webcam(Number($('sample-fps').value)), readParams(), { autoFinalize: false }));
});
$('finalize').addEventListener('click', () => quiet(stream.finalize()));
$('stop').addEventListener('click', () => stream.stop());
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
  set('st-inflight', `${stream.pendingFrames} / ${s.maxInFlight == null ? '–' : stream.inFlightLimit()}`);
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
  const running = stream.isRunning();
  $('start').disabled = running || !selected;
  $('webcam').disabled = running || !navigator.mediaDevices;
  $('finalize').disabled = !running || stream.finalizing;
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
  state, viewer, stream, start, streamUrls, downloadExport,
  finalize: () => stream.finalize(),
  stop: () => stream.stop(),
  imageSource: (items) => sources.images(items),
  videoSource: (file, fps) => sources.video(file, fps),
  webcamSource: (fps) => sources.webcam(fps),
  protocol: { encodeFrame, decodePoints, halfToFloat },
  get pendingFrames() { return stream.pendingFrames; },
};
renderUi();
