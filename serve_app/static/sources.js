// Frame sources of the browser client (as clients/da3_client/sources.py): images, a video file, the webcam.
// A source is `async (sink) => {...}`; the sink (a StreamSession, stream.js) has waitForSlot(), slotFree(),
// sendFrame(jpeg, timestamp), dropFrame(), `stopped` and `maxSide`. Frames are drawn to the preview canvas no
// larger than the session's process_res and sent as JPEG.

/** Draw an image/video/bitmap to `canvas` (longest side <= maxSide) and encode it as JPEG bytes. */
export async function encodeJpeg(canvas, image, maxSide) {
  const w = image.videoWidth || image.width;
  const h = image.videoHeight || image.height;
  const scale = Math.min(1, maxSide / Math.max(w, h));
  canvas.width = Math.max(1, Math.round(w * scale));
  canvas.height = Math.max(1, Math.round(h * scale));
  canvas.getContext('2d').drawImage(image, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((r) => canvas.toBlob(r, 'image/jpeg', 0.9));
  if (!blob) throw new Error('JPEG encoding failed');
  return new Uint8Array(await blob.arrayBuffer());
}

async function toBitmap(item) {
  const blob = item instanceof Blob ? item : await (await fetch(item)).blob();
  return createImageBitmap(blob);
}

export class FrameSources {
  /** `preview`: the canvas frames are drawn to before encoding (the page shows the last one sent). */
  constructor(preview) {
    this.preview = preview;
  }

  async send(sink, image, timestamp) {
    await sink.sendFrame(await encodeJpeg(this.preview, image, sink.maxSide), timestamp);
  }

  /** Images (Blobs/Files or URLs, data: and blob: included), in order. */
  images(items) {
    return async (sink) => {
      for (let i = 0; i < items.length && !sink.stopped; i++) {
        await sink.waitForSlot(); // decode only when it can go out
        const bitmap = await toBitmap(items[i]);
        await this.send(sink, bitmap, i);
        bitmap.close();
      }
    };
  }

  /** A video file sampled at `fps` frames per second of video time. */
  video(file, fps) {
    return async (sink) => {
      const video = document.createElement('video');
      video.muted = true;
      video.preload = 'auto';
      video.src = URL.createObjectURL(file);
      try {
        await new Promise((resolve, reject) => {
          video.onloadeddata = resolve;
          video.onerror = () => reject(new Error(`cannot play ${file.name}`));
        });
        for (let t = 0; t < video.duration && !sink.stopped; t += 1 / fps) {
          await sink.waitForSlot();
          await new Promise((r) => {
            video.onseeked = r;
            video.currentTime = t;
          });
          await this.send(sink, video, t);
        }
      } finally {
        URL.revokeObjectURL(video.src);
      }
    };
  }

  /** The webcam at `fps`: real time, so a frame that would exceed the in-flight limit is dropped, not queued. */
  webcam(fps) {
    return async (sink) => {
      const camera = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false });
      const video = document.createElement('video');
      video.muted = true;
      video.playsInline = true;
      video.srcObject = camera;
      await video.play();
      const t0 = performance.now();
      try {
        while (!sink.stopped && !sink.isEnded()) {
          const tick = performance.now();
          if (sink.slotFree()) await this.send(sink, video, (tick - t0) / 1000);
          else sink.dropFrame();
          await new Promise((r) => setTimeout(r, Math.max(0, 1000 / fps - (performance.now() - tick))));
        }
      } finally {
        camera.getTracks().forEach((t) => t.stop());
      }
    };
  }
}
