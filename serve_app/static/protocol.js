// The browser side of the wire protocol (docs/WEBSOCKET_API.md; serve_app/protocol/ is the server side).
// Typed arrays use the platform byte order; every browser platform in use is little-endian like the wire.
// The constants come from protocol_constants.js, generated from the server's declaration (`make protocol`).
import {
  ENC_FLOAT16, ENC_FLOAT32, FRAME_FLAGS, FRAME_MAGIC, MAX_HEADER_BYTES, POINTS_MAGIC, PREFIX_BYTES,
  PROTOCOL_VERSION,
} from './protocol_constants.js';

export * from './protocol_constants.js';
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

function magic(bytes) {
  return String.fromCharCode(bytes[0], bytes[1], bytes[2], bytes[3]);
}

/** A DA3F binary frame message: "DA3F" | u8 version | u8 flags=0 | u16 LE header_len | JSON header | image. */
export function encodeFrame(image, meta = null) {
  const img = image instanceof Uint8Array ? image : new Uint8Array(image);
  if (!img.length) throw new Error('image bytes are empty');
  const header = meta && Object.keys(meta).length ? utf8.encode(JSON.stringify(meta)) : new Uint8Array(0);
  if (header.length > MAX_HEADER_BYTES) throw new Error('frame header too long');
  const out = new Uint8Array(PREFIX_BYTES + header.length + img.length);
  out.set([...FRAME_MAGIC].map((c) => c.charCodeAt(0)).concat([PROTOCOL_VERSION, FRAME_FLAGS]));
  new DataView(out.buffer).setUint16(6, header.length, true);
  out.set(header, PREFIX_BYTES);
  out.set(img, PREFIX_BYTES + header.length);
  return out.buffer;
}

/** IEEE 754 half -> float for one 16-bit pattern. */
export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24; // subnormal
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

let halfTable = null; // 65536 floats (256 KiB), built on first use: a lookup beats per-value arithmetic

function halfsToFloats(halfs, out) {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) halfTable[i] = halfToFloat(i);
  }
  for (let i = 0; i < halfs.length; i++) out[i] = halfTable[halfs[i]];
  return out;
}

/** Parse a DA3P points message into world positions (origin added) and RGB colours. Throws on a malformed one. */
export function decodePoints(buffer, { useNativeFloat16 = true } = {}) {
  if (ArrayBuffer.isView(buffer)) {
    buffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  }
  const u8 = new Uint8Array(buffer);
  if (u8.length < PREFIX_BYTES || magic(u8) !== POINTS_MAGIC) throw new Error('not a DA3P points message');
  const version = u8[4];
  const encoding = u8[5];
  const headerLen = new DataView(buffer).getUint16(6, true);
  if (version !== PROTOCOL_VERSION) throw new Error(`unsupported DA3P version ${version}`);
  if (encoding !== ENC_FLOAT16 && encoding !== ENC_FLOAT32) throw new Error(`unknown DA3P encoding ${encoding}`);
  const start = PREFIX_BYTES + headerLen;
  if (start > u8.length) throw new Error('DA3P header_len runs past the message');
  const header = JSON.parse(fromUtf8.decode(u8.subarray(PREFIX_BYTES, start)));
  const count = header.count;
  if (!Number.isInteger(count) || count < 0) throw new Error('DA3P header needs an integer count');
  const width = encoding === ENC_FLOAT16 ? 2 : 4;
  const posBytes = count * 3 * width;
  if (u8.length !== start + posBytes + count * 3) {
    throw new Error(`DA3P body is ${u8.length - start} bytes, expected ${posBytes + count * 3}`);
  }
  // The server pads the header so `start` is 4-aligned; copy when a sender did not.
  const posBuf = start % width === 0 ? buffer : buffer.slice(start, start + posBytes);
  const posOff = start % width === 0 ? start : 0;
  const positions = new Float32Array(count * 3);
  if (encoding === ENC_FLOAT32) {
    positions.set(new Float32Array(posBuf, posOff, count * 3));
  } else if (useNativeFloat16 && typeof Float16Array !== 'undefined') {
    positions.set(new Float16Array(posBuf, posOff, count * 3)); // eslint-disable-line no-undef
  } else {
    halfsToFloats(new Uint16Array(posBuf, posOff, count * 3), positions);
  }
  const origin = Array.isArray(header.origin) ? header.origin.map(Number) : [0, 0, 0];
  for (let i = 0; i < positions.length; i += 3) {
    positions[i] += origin[0];
    positions[i + 1] += origin[1];
    positions[i + 2] += origin[2];
  }
  const colors = u8.slice(start + posBytes, start + posBytes + count * 3);
  return { header, encoding, count, origin, positions, colors };
}
