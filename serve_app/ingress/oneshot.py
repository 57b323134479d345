"""The one-shot route: a multipart upload of images and/or videos in, the whole reconstruction out, through the
same workers, windows and batching as a stream (a mixin of the Ingress deployment)."""


import asyncio
import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serve_app import protocol
from serve_app.config import merge_session_params
from serve_app.deployments.session_actor import call
from serve_app.deployments.session_worker import SessionWorker
from serve_app.errors import (
    ErrorCode,
    ServiceError,
)
from serve_app.media.uploads import classify_upload, limited_request
from serve_app.media.video import VideoFrames

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


class OneShotUpload:
    """POST /v1/reconstruct."""

    async def reconstruct_upload(self, request: Request) -> Response:
        """One-shot: multipart `files` (images and/or videos) + optional `params` JSON field ->
        the reconstruction (`?format=json|ply|glb`), through the same windows, batching and alignment."""
        owner = self._owner(self._bearer(request))
        lim = self.args.limits
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "ply", "glb"):
            raise ServiceError(ErrorCode.INVALID_PARAMS, "format must be json, ply or glb",
                               details={"field": "format"})
        try:
            every = max(1, int(request.query_params.get("every", "1")))
        except ValueError:
            raise ServiceError(ErrorCode.INVALID_PARAMS, "every must be an integer", details={"field": "every"})
        # Bytes are counted as they arrive (chunked bodies too); files over 1 MiB spool to disk meanwhile.
        form = await limited_request(request, lim.max_upload_bytes).form(max_files=lim.max_upload_files,
                                                                        max_fields=16)
        uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise ServiceError(ErrorCode.INVALID_MESSAGE, "no files: send images or a video as multipart `files`")
        overrides = protocol.parse_json_object(form.get("params") or "", "params")
        params = merge_session_params(self.args.session_defaults, overrides, lim.max_process_res, limits=lim)
        info = await self.store.create(params.model_dump(), owner)
        sid = info["session_id"]
        worker = await self._worker(sid, params, owner)
        worker.oneshot = True
        try:
            taken = 0
            for up in uploads:
                if taken >= lim.max_upload_frames:
                    break
                try:
                    taken = await self._upload_part(sid, owner, worker, up, taken, every)
                except ServiceError as exc:
                    exc.message = f"{up.filename}: {exc.message}"
                    raise
            await worker.finalize()
            done = await call(self.store.of(sid).wait_finished, sid, lim.model_timeout_s * (1 + taken))
        except BaseException:
            try:
                await self.store.of(sid).delete.remote(sid, owner)
            except Exception:  # noqa: BLE001 - already deleted (that may be why we are here)
                log.debug("upload cleanup: session %s already gone", sid)
            self._drop_worker(sid)
            raise
        if fmt == "ply":
            return await self.export_ply(sid, request)
        if fmt == "glb":
            return await self.export_glb(sid, request)
        traj = await self.export_trajectory(sid, request)
        return JSONResponse({"session_id": sid, "state": done.get("state"), "frames": done.get("frames_processed"),
                             "frames_failed": done.get("frames_failed"), "points_total": done.get("points_total"),
                             "trajectory": traj["frames"], "exports": protocol.export_paths(sid)})

    async def _upload_part(self, sid: str, owner: str | None, worker: SessionWorker, up, taken: int,
                           every: int) -> int:
        """Admit one multipart file's frames (an image, or a video's sampled frames as they decode); returns
        the frame count so far. The bytes decide what the file is, never its name."""
        lim = self.args.limits
        head = await up.read(16)
        await up.seek(0)
        demuxer = classify_upload(head, up.filename, up.content_type)
        if demuxer is None:  # an image: never read past the image limit
            await self._admit_upload_frame(sid, owner, worker, await up.read(lim.max_image_bytes + 1), taken)
            return taken + 1
        frames = VideoFrames(up.file, demuxer, max_frames=lim.max_upload_frames - taken, every=every,
                             limits=self.video_limits)
        step = None
        await self.video_slots.acquire()
        try:
            while taken < lim.max_upload_frames:
                step = self.video_pool.submit(frames.next)
                img = await asyncio.wrap_future(step)
                if img is None:
                    break
                await self._admit_upload_frame(sid, owner, worker, img, taken)
                taken += 1
        finally:
            # Close the decoder in its pool once no step runs there (a cancelled request leaves one running).
            if step is None:
                self.video_pool.submit(frames.close)
            else:
                step.add_done_callback(lambda _: self.video_pool.submit(frames.close))
            self.video_slots.release()
        return taken

    async def _admit_upload_frame(self, sid: str, owner: str | None, worker: SessionWorker, img, index: int
                                  ) -> None:
        """Upload pacing: wait for in-flight room and decode budget, never reject; a session deleted (or taken
        over) meanwhile ends the upload."""
        lim = self.args.limits
        while True:
            while worker.in_flight >= lim.max_in_flight and not worker.closed:
                await asyncio.sleep(0.02)
            if worker.closed:
                raise ServiceError(ErrorCode.SESSION_NOT_FOUND, "the session was deleted during the upload")
            try:
                await self._admit(sid, owner, worker, img, protocol.FrameMeta(frame_id=index))
                return
            except ServiceError as exc:
                if exc.code is not ErrorCode.DECODE_BUDGET_EXCEEDED:
                    raise
                await asyncio.sleep(exc.details.get("retry_after_s", 0.1))
