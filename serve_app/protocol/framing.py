"""The binary framing of the protocol (docs/WEBSOCKET_API.md 3.2 and 3.6), declared once.

Pure constants: `python -m serve_app.protocol.codegen` copies them into the Python client
(clients/da3_client/_protocol.py) and the browser client (serve_app/static/protocol_constants.js).
"""

from __future__ import annotations

import struct

PROTOCOL_VERSION = 1
WS_SUBPROTOCOL = "da3.v1"  # offered by clients and selected by the server
BEARER_SUBPROTOCOL_PREFIX = "bearer."  # browsers send the key as the subprotocol "bearer.<key>"
FRAME_MAGIC = b"DA3F"  # client -> server binary frame message
POINTS_MAGIC = b"DA3P"  # server -> client binary points message
ENC_FLOAT16 = 1  # DA3P encoding byte: positions as little-endian float16 ...
ENC_FLOAT32 = 2  # ... or float32
ENCODINGS = {"float16": ENC_FLOAT16, "float32": ENC_FLOAT32}
PREFIX_FORMAT = "<4sBBH"  # magic, u8 version, u8 flags (frames) / encoding (points), u16 LE header_len
PREFIX_BYTES = struct.calcsize(PREFIX_FORMAT)  # 8
FRAME_FLAGS = 0  # DA3F flags byte: reserved, anything else is refused
MAX_HEADER_BYTES = 0xFFFF  # what the u16 header_len can say
POINTS_ALIGN = 4  # a DA3P header is padded with spaces so the positions start 4-byte aligned
MAX_FRAME_ID_CHARS = 64
