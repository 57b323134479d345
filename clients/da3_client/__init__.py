"""Async Python client for da3-serve (no Ray dependency).

    from da3_client import Da3Client
    async with Da3Client("http://127.0.0.1:8000") as client:
        session = await client.create_session(window_size=6, overlap=2)
        async with client.stream(session["session_id"]) as stream:
            for frame_id, rgb in iter_video_frames("clip.mp4", fps=5):
                await stream.send_frame(rgb, frame_id=frame_id)
            summary = await stream.finalize()
        stream.reconstruction.write_ply("scene.ply")

The wire protocol is documented in docs/WEBSOCKET_API.md.
"""

from da3_client.client import Da3Client
from da3_client.errors import Da3Error
from da3_client.reconstruction import Reconstruction
from da3_client.sources import iter_image_files, iter_video_frames, resize_longest
from da3_client.stream import StreamSession
from da3_client.wire import PointChunk, decode_points, encode_frame, encode_jpeg, frame_header

__all__ = ["Da3Client", "Da3Error", "PointChunk", "Reconstruction", "StreamSession", "decode_points",
           "encode_frame", "encode_jpeg", "frame_header", "iter_image_files", "iter_video_frames",
           "resize_longest"]
