// Live point cloud + camera frustums with three.js. Geometry is kept in the server's OpenCV world
// (x right, y down, z forward); one group rotation (diag(1,-1,-1)) shows it in three.js axes (y up, -z forward).
// Each window's points and frustums live in a group whose matrix is the window's latest correction.
import * as THREE from './vendor/three/three.module.min.js';
import { OrbitControls } from './vendor/three/OrbitControls.js';

/** A preallocated BufferGeometry that doubles its capacity when full; only the new range is uploaded. */
class GrowingGeometry {
  constructor(capacity) {
    this.count = 0;
    this.positions = null;
    this.colors = null;
    this.geometry = null;
    this.allocate(capacity);
  }

  allocate(capacity) {
    const positions = new Float32Array(capacity * 3);
    const colors = new Uint8Array(capacity * 3);
    if (this.positions) {
      positions.set(this.positions.subarray(0, this.count * 3));
      colors.set(this.colors.subarray(0, this.count * 3));
    }
    const old = this.geometry;
    const g = new THREE.BufferGeometry();
    g.setAttribute('position', new THREE.BufferAttribute(positions, 3).setUsage(THREE.DynamicDrawUsage));
    g.setAttribute('color', new THREE.BufferAttribute(colors, 3, true).setUsage(THREE.DynamicDrawUsage));
    g.setDrawRange(0, this.count);
    // Culling would need a bounding sphere recomputed on every append; the cloud is always in view anyway.
    g.boundingSphere = new THREE.Sphere(new THREE.Vector3(), Infinity);
    this.positions = positions;
    this.colors = colors;
    this.capacity = capacity;
    this.geometry = g;
    if (old) old.dispose();
  }

  append(positions, colors) {
    const n = positions.length / 3;
    if (!n) return false;
    let replaced = false;
    if (this.count + n > this.capacity) {
      let cap = this.capacity;
      while (this.count + n > cap) cap *= 2;
      this.allocate(cap);
      replaced = true;
    }
    this.positions.set(positions, this.count * 3);
    this.colors.set(colors, this.count * 3);
    for (const name of ['position', 'color']) {
      const attr = this.geometry.getAttribute(name);
      attr.addUpdateRange(this.count * 3, n * 3);
      attr.needsUpdate = true;
    }
    this.count += n;
    this.geometry.setDrawRange(0, this.count);
    return replaced;
  }
}

/** x -> s R(q) x + t as a THREE.Matrix4, from a correction row's [s, qx, qy, qz, qw, tx, ty, tz]. */
export function correctionMatrix(s, qx, qy, qz, qw, tx, ty, tz) {
  return new THREE.Matrix4().compose(new THREE.Vector3(tx, ty, tz), new THREE.Quaternion(qx, qy, qz, qw).normalize(),
    new THREE.Vector3(s, s, s));
}

export class Viewer {
  constructor(canvas) {
    this.canvas = canvas;
    // One group per window (its points and frustums) with the window's correction as its matrix (identity until a
    // `correction` names it): a global re-optimisation moves windows on the GPU without touching their points.
    this.windows = new Map();
    this.clearCounters();
    this.webgl = false;
    this.error = null;
    try {
      this.renderer = new THREE.WebGLRenderer({ canvas, antialias: false });
      this.webgl = true;
    } catch (err) {
      this.renderer = null;
      this.error = String(err && err.message ? err.message : err);
      return;
    }
    // Colours arrive as sRGB bytes: show them as they are instead of treating them as linear.
    this.renderer.outputColorSpace = THREE.LinearSRGBColorSpace;
    this.renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
    this.renderer.setClearColor(new THREE.Color().setRGB(16 / 255, 20 / 255, 26 / 255, THREE.LinearSRGBColorSpace));
    this.scene = new THREE.Scene();
    this.world = new THREE.Group();
    this.world.rotation.x = Math.PI; // OpenCV -> three.js: flip y and z
    this.scene.add(this.world);
    this.pointMaterial = new THREE.PointsMaterial({ size: 2, sizeAttenuation: false, vertexColors: true });
    this.lineMaterial = new THREE.LineBasicMaterial({ vertexColors: true });
    this.camera = new THREE.PerspectiveCamera(60, 1, 0.01, 1000);
    this.camera.position.set(0, 0, 3);
    this.controls = new OrbitControls(this.camera, canvas);
    this.controls.addEventListener('start', () => { this.userMoved = true; });
    this.controls.addEventListener('change', () => { this.dirty = true; });
    new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
    this.resize();
    const loop = () => {
      if (this.dirty) this.render();
      requestAnimationFrame(loop);
    };
    requestAnimationFrame(loop);
  }

  resize() {
    if (!this.renderer) return;
    const el = this.canvas.parentElement;
    const w = Math.max(el.clientWidth, 1);
    const h = Math.max(el.clientHeight, 1);
    this.renderer.setSize(w, h, false);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
    this.dirty = true;
  }

  render() {
    this.dirty = false;
    this.renderer.render(this.scene, this.camera);
  }

  /** The window's entry: its point chunks (positions as received), frustum lines and transform. */
  windowEntry(index) {
    let w = this.windows.get(index);
    if (w) return w;
    w = { chunks: [], lines: null, frustums: null, matrix: new THREE.Matrix4(), group: null };
    if (this.renderer) {
      w.group = new THREE.Group();
      w.group.matrixAutoUpdate = false;
      this.world.add(w.group);
    }
    this.windows.set(index, w);
    return w;
  }

  /** World positions (Float32Array xyz, as received) and uint8 RGB colours of one DA3P chunk of window `index`. */
  addPoints(positions, colors, index = 0) {
    const n = positions.length / 3;
    for (let i = 0; i < positions.length; i += 3) {
      const x = positions[i], y = positions[i + 1], z = positions[i + 2];
      this.sum[0] += x; this.sum[1] += y; this.sum[2] += z;
      this.sumSq += x * x + y * y + z * z;
    }
    this.pointCount += n;
    const w = this.windowEntry(index);
    const chunk = { positions, colors, object: null };
    w.chunks.push(chunk);
    if (w.group && n) {
      const g = new THREE.BufferGeometry();
      g.setAttribute('position', new THREE.BufferAttribute(chunk.positions, 3));
      g.setAttribute('color', new THREE.BufferAttribute(chunk.colors, 3, true));
      // Culling would need the bounding sphere in the corrected world; the cloud is always in view anyway.
      g.boundingSphere = new THREE.Sphere(new THREE.Vector3(), Infinity);
      chunk.object = new THREE.Points(g, this.pointMaterial);
      w.group.add(chunk.object);
    }
    if (!this.userMoved) this.fit();
    this.dirty = true;
  }

  /** A camera frustum from a frame_result: pose (4x4 c2w, OpenCV), K (3x3), image size [w, h], its window. */
  addFrustum(pose, K, size, depth = 1.0, rgb = [255, 170, 40], index = 0) {
    const [w, h] = size;
    const fx = K[0][0], fy = K[1][1], cx = K[0][2], cy = K[1][2];
    const toWorld = (p) => [0, 1, 2].map((r) => pose[r][0] * p[0] + pose[r][1] * p[1] + pose[r][2] * p[2] + pose[r][3]);
    const c = toWorld([0, 0, 0]);
    const corners = [[0, 0], [w, 0], [w, h], [0, h]].map(([u, v]) => toWorld([(u - cx) / fx * depth,
      (v - cy) / fy * depth, depth]));
    const verts = [];
    for (let i = 0; i < 4; i++) verts.push(c, corners[i], corners[i], corners[(i + 1) % 4]);
    const positions = new Float32Array(verts.flat());
    const colors = new Uint8Array(verts.length * 3);
    for (let i = 0; i < verts.length; i++) colors.set(rgb, i * 3);
    const win = this.windowEntry(index);
    if (!win.lines) win.lines = new GrowingGeometry(64);
    if (win.lines.append(positions, colors) && win.frustums) win.frustums.geometry = win.lines.geometry;
    if (win.group && !win.frustums) {
      win.frustums = new THREE.LineSegments(win.lines.geometry, this.lineMaterial);
      win.group.add(win.frustums);
    }
    if (!this.firstCamera) this.firstCamera = c;
    this.frustumCount += 1;
    this.dirty = true;
  }

  /** The camera of a frame_result message, sized by its depth; false when it has no pose. */
  addFrameResult(m) {
    if (!(m.pose && m.intrinsics && m.image_size)) return false;
    const depth = m.depth && m.depth.median > 0 ? m.depth.median * 0.15 : 0.1;
    this.addFrustum(m.pose, m.intrinsics, m.image_size, depth, undefined, m.window ?? 0);
    return true;
  }

  /** A `correction` message's rows [window, s, qx, qy, qz, qw, tx, ty, tz]: each named window's absolute transform
   * (docs/WEBSOCKET_API.md 3.5.1). Windows not seen yet keep it for when their points arrive. */
  applyCorrection(rows) {
    for (const [index, ...v] of rows) {
      const w = this.windowEntry(index);
      w.matrix = correctionMatrix(...v);
      if (w.group) {
        w.group.matrix.copy(w.matrix);
        w.group.matrixWorldNeedsUpdate = true;
      }
    }
    this.corrections += 1;
    this.dirty = true;
  }

  /** Every point as shown: each window's chunks mapped by its current transform (Float32Array xyz, OpenCV world). */
  worldPositions() {
    const out = new Float32Array(this.pointCount * 3);
    const v = new THREE.Vector3();
    let k = 0;
    for (const w of this.windows.values()) {
      for (const c of w.chunks) {
        for (let i = 0; i < c.positions.length; i += 3) {
          v.set(c.positions[i], c.positions[i + 1], c.positions[i + 2]).applyMatrix4(w.matrix);
          out[k++] = v.x; out[k++] = v.y; out[k++] = v.z;
        }
      }
    }
    return out;
  }

  /** Look at the cloud's centre from behind the first camera, far enough to see its spread. */
  fit() {
    if (!this.renderer || !this.pointCount) return;
    const n = this.pointCount;
    const c = this.sum.map((s) => s / n);
    const spread = Math.sqrt(Math.max(this.sumSq / n - (c[0] ** 2 + c[1] ** 2 + c[2] ** 2), 1e-12));
    const target = new THREE.Vector3(c[0], -c[1], -c[2]);
    let dir = new THREE.Vector3(0, 0.35, 1);
    if (this.firstCamera) {
      const cam = new THREE.Vector3(this.firstCamera[0], -this.firstCamera[1], -this.firstCamera[2]);
      if (cam.distanceTo(target) > 1e-6) dir = cam.sub(target).add(new THREE.Vector3(0, 0.3 * spread, 0));
    }
    dir.normalize();
    this.camera.position.copy(target).addScaledVector(dir, spread * 3.0);
    this.camera.near = spread * 0.01;
    this.camera.far = spread * 200;
    this.camera.updateProjectionMatrix();
    this.controls.target.copy(target);
    this.controls.update();
    this.dirty = true;
  }

  resetView() {
    this.userMoved = false;
    this.fit();
  }

  clear() {
    for (const w of this.windows.values()) {
      for (const c of w.chunks) if (c.object) c.object.geometry.dispose();
      if (w.lines) w.lines.geometry.dispose();
      if (w.group) this.world.remove(w.group);
    }
    this.windows = new Map();
    this.clearCounters();
  }

  /** Counters and camera state of an empty scene (constructor and reset). */
  clearCounters() {
    this.pointCount = 0;
    this.frustumCount = 0;
    this.corrections = 0;
    this.sum = [0, 0, 0];
    this.sumSq = 0;
    this.firstCamera = null;
    this.userMoved = false;
    this.dirty = true;
  }
}
