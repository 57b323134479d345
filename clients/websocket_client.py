#!/usr/bin/env python3
"""Stream a video or an image folder to da3-serve and save the reconstruction.

    python clients/websocket_client.py --url http://127.0.0.1:8000 --video clip.mp4 --fps 5 --output scene.ply

Exit status: 0 success, 1 server/connection error (its code and message are printed), 2 bad arguments,
130 interrupted by Ctrl-C (the session is still finalized and the outputs written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

try:
    import da3_client  # noqa: F401 - installed package
except ImportError:  # running from a checkout: clients/da3_client sits next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from da3_client import Da3Client, Da3Error, iter_image_files, iter_video_frames
from da3_client.sources import list_image_files, video_frame_count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (http or https)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file to stream")
    src.add_argument("--images", help="image directory or glob pattern (natural sort order)")
    p.add_argument("--output", default=None, help="PLY to write from the streamed points")
    p.add_argument("--trajectory", default=None, help="JSON trajectory to write (camera-to-world poses)")
    p.add_argument("--token", default=os.environ.get("DA3_API_KEY"), help="API key (default: $DA3_API_KEY)")
    p.add_argument("--fps", type=float, default=None, help="sample the video at most at this rate")
    p.add_argument("--every", type=int, default=1, help="keep every N-th frame")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--resize", type=int, default=None, help="downscale so the longest side is PX")
    p.add_argument("--process-res", type=int, default=None, help="session process_res (server default if unset)")
    p.add_argument("--window", type=int, default=None, help="session window_size")
    p.add_argument("--overlap", type=int, default=None, help="session overlap")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for finalize")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the text summary")
    p.add_argument("--keep-session", action="store_true", help="do not delete the session at the end")
    args = p.parse_args(argv)
    if args.every < 1 or (args.max_frames is not None and args.max_frames < 1) or not 1 <= args.jpeg_quality <= 100:
        p.error("--every and --max-frames must be >= 1, --jpeg-quality in 1..100")
    return args


def frame_source(args: argparse.Namespace):
    """The frames to send as (frame_id, RGB, timestamp); the source is checked before anything is sent."""
    if args.video:
        if not Path(args.video).is_file():
            raise FileNotFoundError(f"video not found: {args.video}")
        return iter_video_frames(args.video, every=args.every, fps=args.fps, max_frames=args.max_frames,
                                 resize=args.resize, with_timestamp=True)
    if not list_image_files(args.images):
        raise FileNotFoundError(f"no image files match {args.images}")
    return ((fid, img, None) for fid, img in iter_image_files(args.images, every=args.every,
                                                               max_frames=args.max_frames, resize=args.resize))


def _total(args: argparse.Namespace) -> int | None:
    if args.video and not args.fps:
        n = video_frame_count(args.video)
        if n:
            n = -(-n // args.every)
            return min(n, args.max_frames) if args.max_frames else n
    return args.max_frames


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:  # first Ctrl-C: stop sending and finalize; a second one aborts
        loop.add_signal_handler(signal.SIGINT, lambda: (stop.set(), loop.remove_signal_handler(signal.SIGINT)))
    except (NotImplementedError, RuntimeError):
        pass
    frames = frame_source(args)
    started = time.time()
    bar = None
    if not args.json:
        from tqdm import tqdm

        bar = tqdm(total=_total(args), unit="frame", desc="sent", dynamic_ncols=True)

    async with Da3Client(args.url, token=args.token) as client:
        info = await client.create_session(process_res=args.process_res, window_size=args.window,
                                           overlap=args.overlap)
        sid = info["session_id"]
        stream = client.stream(sid, jpeg_quality=args.jpeg_quality)

        def on_message(msg) -> None:
            if bar is not None and isinstance(msg, dict) and msg.get("type") in ("frame_result", "ack"):
                el = max(time.time() - started, 1e-6)
                bar.set_postfix(processed=stream.frames_processed, points=stream.reconstruction.num_points,
                                fps=f"{stream.frames_processed / el:.1f}", refresh=False)

        stream.on_message = on_message
        try:
            async with stream:
                sentinel = object()
                while not stop.is_set():
                    item = await asyncio.to_thread(next, frames, sentinel)  # decoding stays off the loop
                    if item is sentinel:
                        break
                    fid, img, t = item
                    await stream.send_frame(img, frame_id=fid, timestamp=t)
                    if bar is not None:
                        bar.update(1)
                summary = await stream.finalize(timeout=args.timeout)
        finally:
            if bar is not None:
                bar.close()
            if not args.keep_session:
                try:
                    await client.delete_session(sid)
                except Da3Error:
                    pass

    recon = stream.reconstruction
    if args.output:
        recon.write_ply(args.output)
    if args.trajectory:
        recon.write_trajectory(args.trajectory)
    result = {
        "session_id": sid, "frames_sent": stream.frames_sent, "frames_processed": summary.get("frames_processed"),
        "frames_rejected": len(stream.rejected), "windows": summary.get("windows"),
        "points_streamed": recon.num_points, "points_total": summary.get("points_total"),
        "poses": len(recon.poses), "duration_s": round(time.time() - started, 3),
        # the PLY and trajectory are written with these corrections applied (global optimisation)
        "corrections": recon.corrections, "correction_version": recon.correction_version,
        "reconnects": stream.reconnects, "interrupted": stop.is_set(),
        "output": str(Path(args.output)) if args.output else None,
        "trajectory": str(Path(args.trajectory)) if args.trajectory else None,
        "session_kept": bool(args.keep_session),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"session {sid}: {result['frames_sent']} frames sent, {result['frames_processed']} processed "
              f"({result['frames_rejected']} rejected), {result['windows']} windows, "
              f"{result['points_streamed']} points, {result['duration_s']:.1f} s")
        for r in stream.rejected[:10]:
            print(f"  rejected frame {r.get('frame_id')}: {r.get('code')}: {r.get('message')}")
        if args.output:
            print(f"point cloud: {args.output}")
        if args.trajectory:
            print(f"trajectory:  {args.trajectory}")
    return 130 if stop.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except Da3Error as exc:
        where = f" (status {exc.status})" if exc.status else ""
        print(f"error: {exc.code}: {exc.message}{where}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"code": exc.code, "message": exc.message, "status": exc.status}}))
        return 1
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
