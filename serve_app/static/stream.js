// WebSocket side of the browser client (as clients/da3_client/stream.py): one stream per session on
// /ws/reconstruct/{id}: DA3F frames out, JSON messages and DA3P points in, flow control, resume after a drop.
// Flow control: at most min(max_in_flight, the caller's cap) frames are sent and neither processed nor
// rejected. A dropped connection is resumed from the last record (resume_from=lastSeq); frames sent and never
// acknowledged are counted as lost. Points and corrections go to `viewer` (viewer.js) and are answered with
// `received` (result flow control, docs/WEBSOCKET_API.md 3.7).
import { ServerError } from './errors.js';
import {
  BEARER_SUBPROTOCOL_PREFIX, CLOSE, RETRYABLE_CLOSES, WS_SUBPROTOCOL, decodePoints, encodeFrame,
} from './protocol.js';

const FLUSH_AFTER_MS = 3000; // flow control stuck this long (window larger than max_in_flight): ask for a flush
const MAX_RECONNECTS = 3;

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => { d.resolve = resolve; d.reject = reject; });
  d.promise.catch(() => {}); // rejection is reported through state; callers may still await it
  return d;
}

/** The stream's URL; the key never goes in it (it rides as a subprotocol). */
export function websocketUrl(base, sessionId, resumeFrom = null) {
  const q = new URLSearchParams();
  if (resumeFrom != null) q.set('resume_from', String(resumeFrom));
  return `${base.replace(/^http/, 'ws')}/ws/reconstruct/${sessionId}${q.size ? `?${q}` : ''}`;
}

/**
 * One session at a time, reused by the page. `state` is one object for the page's life (the UI and the tests
 * read it); begin() resets it. Sources (sources.js) call waitForSlot / slotFree / sendFrame / dropFrame.
 * onChange: called after any state change (the UI redraws); onErrors: after the error list changed.
 */
export class StreamSession {
  constructor(settings, viewer, { onChange = () => {}, onErrors = () => {} } = {}) {
    this.settings = settings;
    this.viewer = viewer;
    this.onChange = onChange;
    this.onErrors = onErrors;
    this.state = {};
    this.ws = null;
    this.waiters = [];
    this.resetSession();
    this.resetState();
  }

  resetState() {
    Object.assign(this.state, {
      status: 'idle', sessionId: null, params: null, maxInFlight: null, inFlight: 0,
      framesSent: 0, framesAcked: 0, framesProcessed: 0, framesFailed: 0, framesRejected: 0, framesDropped: 0,
      framesLost: 0, pointsReceived: 0, pointsRendered: 0, pointsHistory: [], windows: 0, frustums: 0, lastSeq: 0,
      lastWindow: null, errors: [], summary: null, webgl: this.viewer.webgl, fps: 0, latencyP50: null,
      reconnects: 0,
      maxOutstanding: 0, // most frames ever sent and not yet processed/rejected: flow control keeps it <= the limit
      corrections: 0, correctionVersion: 0, // `correction` records applied (global re-optimisation)
    });
  }

  resetSession(maxInFlight = Infinity) {
    this.pending = new Set(); // frame_ids sent and neither processed nor rejected: the flow-control window
    this.acked = new Set();
    this.nextFrameId = 0;
    this.stopRequested = false;
    this.clientCap = maxInFlight > 0 ? maxInFlight : Infinity; // optional limit below the server's
    this.finalizing = false;
    this.fatalSeen = false;
    this.pump = null;
    this.done = null; // {promise, resolve, reject} settled by summary / failure
    this.latencies = [];
    this.processedAt = [];
  }

  // --- what the page and the sources read --------------------------------------------------------------------
  get pendingFrames() {
    return this.pending.size;
  }

  get stopped() {
    return this.stopRequested;
  }

  /** The longest side a frame needs (the session's process_res). */
  get maxSide() {
    return (this.state.params && this.state.params.process_res) || 504;
  }

  isEnded() {
    return ['complete', 'failed', 'stopped', 'idle'].includes(this.state.status);
  }

  isRunning() {
    return this.state.status !== 'idle' && !this.isEnded();
  }

  inFlightLimit() {
    return Math.min(this.state.maxInFlight ?? 0, this.clientCap);
  }

  slotFree() {
    return this.ws && this.ws.readyState === WebSocket.OPEN && this.pending.size < this.inFlightLimit();
  }

  // --- lifecycle (the page creates the session over HTTP between begin() and open()) -------------------------
  /** Drop any previous stream and reset for a new session (status "creating"). */
  begin({ maxInFlight = Infinity } = {}) {
    if (this.isRunning()) throw new Error('a session is already running');
    if (this.ws) this.ws.close(CLOSE.NORMAL);
    this.ws = null;
    this.viewer.clear();
    this.resetState();
    this.resetSession(maxInFlight);
    this.done = deferred();
    this.onErrors();
    this.state.status = 'creating';
    this.notify();
  }

  /** Connect to the created session (`info`: the create answer) and wait for `ready`. */
  async open(info) {
    this.state.sessionId = info.session_id;
    this.state.params = info.params;
    return this.connect(null);
  }

  /** The session could not be created or opened: fail it with the error's code. */
  failStart(err) {
    if (this.state.status !== 'failed') this.fail(err.message.replace(/^[A-Z_0-9]+: /, ''), err.code || 'CLIENT_ERROR');
  }

  /** Run `source(this)`; finalize at its end when autoFinalize. Resolves with the summary. */
  async run(source, autoFinalize = true) {
    this.pump = (async () => {
      try {
        await source(this);
      } catch (err) {
        if (!this.stopRequested && !this.isEnded()) this.recordError(err.code || 'SOURCE_ERROR', err.message);
      }
    })();
    if (autoFinalize) {
      await this.pump;
      if (!this.isEnded()) this.finalize();
    }
    return this.done.promise;
  }

  /** Stop the source, then ask the server to process what is left; resolves with the summary. */
  async finalize() {
    if (!this.done) return null;
    this.stopRequested = true;
    if (this.pump) await this.pump;
    if (!this.isEnded() && !this.finalizing) {
      this.finalizing = true;
      this.state.status = 'finalizing';
      this.send({ type: 'finalize' });
      this.notify();
    }
    return this.done.promise;
  }

  /** Close without finalizing; the session stays on the server (it can be resumed or exported). */
  stop() {
    this.stopRequested = true;
    if (!this.isEnded()) this.state.status = 'stopped';
    if (this.ws) this.ws.close(CLOSE.NORMAL);
    if (this.done) this.done.reject(new Error('stopped'));
    this.notify();
  }

  // --- frames --------------------------------------------------------------------------------------------------
  /** Resolves when one more frame may be sent without exceeding the in-flight limit. */
  async waitForSlot() {
    let since = performance.now();
    let seen = this.state.framesProcessed;
    let flushed = false;
    while (!this.slotFree()) {
      if (this.stopRequested || this.isEnded()) throw new Error('stream stopped');
      await new Promise((r) => {
        this.waiters.push(r);
        setTimeout(r, 500);
      });
      if (this.state.framesProcessed !== seen) {
        seen = this.state.framesProcessed;
        since = performance.now();
        flushed = false;
      } else if (!flushed && performance.now() - since > FLUSH_AFTER_MS && this.pending.size) {
        this.send({ type: 'flush' });
        flushed = true;
      }
    }
  }

  /** Send one encoded image (JPEG bytes) as a DA3F frame, after waiting for a slot. */
  async sendFrame(jpeg, timestamp) {
    if (!this.slotFree()) await this.waitForSlot();
    const id = this.nextFrameId++;
    this.ws.send(encodeFrame(jpeg, { frame_id: id, timestamp }));
    this.pending.add(id);
    this.state.framesSent += 1;
    this.state.maxOutstanding = Math.max(this.state.maxOutstanding, this.pending.size);
    this.onChange();
  }

  /** A real-time source skipped a frame (no slot free). */
  dropFrame() {
    this.state.framesDropped += 1;
  }

  // --- errors and waiting ----------------------------------------------------------------------------------------
  recordError(code, message, extra = {}) {
    this.state.errors.push({ code, message, fatal: false, time: Date.now(), ...extra });
    this.onErrors();
  }

  notify() {
    const w = this.waiters;
    this.waiters = [];
    w.forEach((fn) => fn());
    this.onChange();
  }

  fail(message, code = 'CLIENT_ERROR') {
    if (this.state.status === 'complete') return;
    this.state.status = 'failed';
    if (message) this.recordError(code, message, { fatal: true });
    if (this.done) this.done.reject(new Error(message || 'session failed'));
    this.notify();
  }

  send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(typeof msg === 'string' ? msg : JSON.stringify(msg));
    }
  }

  // --- connection --------------------------------------------------------------------------------------------------
  connect(resumeFrom) {
    return new Promise((resolve, reject) => {
      const url = websocketUrl(this.settings.base, this.state.sessionId, resumeFrom);
      // The key rides as a subprotocol (never in the URL); the server answers with WS_SUBPROTOCOL only.
      const key = this.settings.key;
      let sock;
      try {
        sock = new WebSocket(url, key ? [WS_SUBPROTOCOL, `${BEARER_SUBPROTOCOL_PREFIX}${key}`] : [WS_SUBPROTOCOL]);
      } catch (err) {
        reject(new ServerError('CLIENT_ERROR', `cannot open the stream: ${err.message} (an API key may hold only `
          + "letters, digits and !#$%&'*+-.^_`|~)"));
        return;
      }
      sock.binaryType = 'arraybuffer';
      this.ws = sock;
      let ready = false;
      sock.onmessage = (ev) => {
        if (sock !== this.ws) return;
        if (typeof ev.data !== 'string') {
          this.onPoints(ev.data);
          return;
        }
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (err) {
          this.recordError('CLIENT_DECODE', `unparseable server message: ${err.message}`);
          return;
        }
        if (msg.type === 'ready') {
          ready = true;
          this.onReady(msg, resumeFrom != null);
          resolve(msg);
        } else {
          this.onMessage(msg);
        }
      };
      sock.onclose = (ev) => {
        if (!ready) {
          const last = this.state.errors[this.state.errors.length - 1];
          reject(last && last.fatal ? new ServerError(last.code, last.message)
            : new Error(`WebSocket closed (${ev.code}) before ready`));
        }
        if (sock === this.ws) this.onClose(ev);
      };
    });
  }

  onReady(msg, resumed) {
    this.state.maxInFlight = msg.max_in_flight;
    this.state.inFlight = msg.in_flight;
    if (resumed) {
      // Frames sent but never acknowledged were lost with the old connection.
      for (const id of [...this.pending]) {
        if (!this.acked.has(id)) {
          this.pending.delete(id);
          this.state.framesLost += 1;
        }
      }
      if (this.finalizing) this.send({ type: 'finalize' });
    }
    this.state.status = this.finalizing ? 'finalizing' : 'streaming';
    this.notify();
  }

  async onClose(ev) {
    const state = this.state;
    this.ws = null;
    if (state.status === 'complete' || state.status === 'stopped') {
      this.notify();
      return;
    }
    // Fatal errors and every close the server's policy does not call retryable are final; a dropped
    // connection (RETRYABLE_CLOSES, generated from serve_app/errors.py) is resumed from the last record.
    if (this.fatalSeen || !RETRYABLE_CLOSES.includes(ev.code) || state.reconnects >= MAX_RECONNECTS) {
      this.fail(this.fatalSeen ? null : `connection closed (${ev.code} ${ev.reason || ''})`.trim(),
        'CONNECTION_CLOSED');
      return;
    }
    state.status = 'reconnecting';
    state.reconnects += 1;
    this.notify();
    await new Promise((r) => setTimeout(r, 1000 * state.reconnects));
    try {
      await this.connect(state.lastSeq);
    } catch (err) {
      this.fail(`reconnect failed: ${err.message}`, err.code || 'CONNECTION_CLOSED');
    }
  }

  // --- messages ----------------------------------------------------------------------------------------------------
  onMessage(m) {
    const state = this.state;
    switch (m.type) {
      case 'ack':
        state.framesAcked += 1;
        this.acked.add(m.frame_id);
        state.inFlight = m.in_flight;
        state.maxInFlight = m.max_in_flight;
        break;
      case 'error':
        state.errors.push({ code: m.code, message: m.message, fatal: m.fatal, frame_id: m.frame_id, time: Date.now() });
        if (m.frame_id != null && this.pending.delete(m.frame_id)) state.framesRejected += 1;
        if (m.fatal) this.fatalSeen = true;
        this.onErrors();
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
        this.onFrameResult(m);
        break;
      case 'correction':
        this.onCorrection(m);
        break;
      case 'summary':
        state.summary = m;
        state.status = 'complete';
        if (this.done) this.done.resolve(m);
        break;
      default:
        break; // pong and future message types
    }
    this.notify();
  }

  onFrameResult(m) {
    const state = this.state;
    state.framesProcessed += 1;
    if (m.failed) state.framesFailed += 1;
    this.pending.delete(m.frame_id);
    if (typeof m.latency_ms === 'number') {
      this.latencies.push(m.latency_ms);
      if (this.latencies.length > 200) this.latencies.shift();
      const sorted = [...this.latencies].sort((a, b) => a - b);
      state.latencyP50 = sorted[Math.floor(sorted.length / 2)];
    }
    const now = performance.now();
    this.processedAt.push(now);
    this.processedAt = this.processedAt.filter((t) => now - t <= 5000);
    state.fps = this.processedAt.length > 1 ? ((this.processedAt.length - 1) * 1000) / (now - this.processedAt[0]) : 0;
    if (this.viewer.addFrameResult(m)) state.frustums = this.viewer.frustumCount;
  }

  /** Per-window absolute transforms (docs/WEBSOCKET_API.md 3.5.1): the viewer moves those windows' groups. */
  onCorrection(m) {
    const state = this.state;
    if (!Array.isArray(m.transforms)) {
      this.recordError('CLIENT_DECODE', 'correction without transforms');
      return;
    }
    this.viewer.applyCorrection(m.transforms);
    state.corrections += 1;
    state.correctionVersion = Math.max(state.correctionVersion, m.version || 0);
    if (Number.isInteger(m.seq)) {
      state.lastSeq = Math.max(state.lastSeq, m.seq);
      this.send({ type: 'received', seq: m.seq }); // a complete record: acknowledged like a points message
    }
  }

  onPoints(buffer) {
    let chunk;
    try {
      chunk = decodePoints(buffer);
    } catch (err) {
      this.recordError('CLIENT_DECODE', `bad points message: ${err.message}`);
      return;
    }
    this.viewer.addPoints(chunk.positions, chunk.colors, chunk.header.window ?? 0);
    // Result flow control: without `received` the server pauses after max_unacked_result_bytes.
    if (Number.isInteger(chunk.header.seq)) this.send({ type: 'received', seq: chunk.header.seq });
    this.state.pointsReceived += chunk.count;
    this.state.pointsRendered = this.viewer.pointCount;
    this.state.pointsHistory.push(this.state.pointsRendered);
    this.onChange();
  }
}
