// Live point cloud + camera frustums with three.js. Geometry is kept in the server's OpenCV world
// (x right, y down, z forward); one group rotation (diag(1,-1,-1)) shows it in three.js axes (y up, -z forward).
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

export class Viewer {
  constructor(canvas) {
    this.canvas = canvas;
    this.points = new GrowingGeometry(1 << 16);
    this.lines = new GrowingGeometry(1 << 10);
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
    this.cloud = new THREE.Points(this.points.geometry,
      new THREE.PointsMaterial({ size: 2, sizeAttenuation: false, vertexColors: true }));
    this.frustums = new THREE.LineSegments(this.lines.geometry, new THREE.LineBasicMaterial({ vertexColors: true }));
    this.world.add(this.cloud, this.frustums);
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

  /** World positions (Float32Array xyz) and uint8 RGB colours of one DA3P chunk. */
  addPoints(positions, colors) {
    const n = positions.length / 3;
    for (let i = 0; i < positions.length; i += 3) {
      const x = positions[i], y = positions[i + 1], z = positions[i + 2];
      this.sum[0] += x; this.sum[1] += y; this.sum[2] += z;
      this.sumSq += x * x + y * y + z * z;
    }
    this.pointCount += n;
    if (this.points.append(positions, colors) && this.cloud) this.cloud.geometry = this.points.geometry;
    if (!this.userMoved) this.fit();
    this.dirty = true;
  }

  /** A camera frustum from a frame_result: pose (4x4 c2w, OpenCV), K (3x3), image size [w, h]. */
  addFrustum(pose, K, size, depth = 1.0, rgb = [255, 170, 40]) {
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
    if (this.lines.append(positions, colors) && this.frustums) this.frustums.geometry = this.lines.geometry;
    if (!this.firstCamera) this.firstCamera = c;
    this.frustumCount += 1;
    this.dirty = true;
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
    this.points.geometry.dispose();
    this.lines.geometry.dispose();
    this.points = new GrowingGeometry(1 << 16);
    this.lines = new GrowingGeometry(1 << 10);
    if (this.cloud) {
      this.cloud.geometry = this.points.geometry;
      this.frustums.geometry = this.lines.geometry;
    }
    this.clearCounters();
  }

  /** Counters and camera state of an empty scene (constructor and reset). */
  clearCounters() {
    this.pointCount = 0;
    this.frustumCount = 0;
    this.sum = [0, 0, 0];
    this.sumSq = 0;
    this.firstCamera = null;
    this.userMoved = false;
    this.dirty = true;
  }
}
