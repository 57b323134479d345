"""Wire protocol: round trips, every malformed case, and property tests that parsers only raise ServiceError."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app import protocol as P
from serve_app.errors import ErrorCode, ServiceError

IMG = b"\xff\xd8\xff\xe0fake-jpeg-bytes"
K = [[100.0, 0.0, 50.0], [0.0, 110.0, 40.0], [0.0, 0.0, 1.0]]
POSE = [[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 1.0]]


def raw_frame(header: bytes, image: bytes = IMG, version: int = 1, flags: int = 0, hlen: int | None = None) -> bytes:
    return struct.pack("<4sBBH", b"DA3F", version, flags, len(header) if hlen is None else hlen) + header + image


def code_of(fn, *args, **kwargs) -> ErrorCode:
    with pytest.raises(ServiceError) as ei:
        fn(*args, **kwargs)
    assert ei.value.fatal is False
    return ei.value.code


# --- binary frames ---------------------------------------------------------------------------------------------
def test_frame_round_trip_with_header():
    meta = {"frame_id": "cam0-17", "timestamp": 12.5, "intrinsics": K, "pose": POSE}
    data = P.encode_frame_message(IMG, meta)
    assert data[:4] == P.FRAME_MAGIC and data[4] == P.PROTOCOL_VERSION and data[5] == 0
    frame = P.parse_binary_message(data)
    assert frame.image == IMG
    assert frame.meta.frame_id == "cam0-17" and frame.meta.timestamp == 12.5
    assert frame.meta.intrinsics == K and frame.meta.pose == POSE


def test_frame_round_trip_without_header_and_bare_image():
    data = P.encode_frame_message(IMG, None)
    assert struct.unpack_from("<H", data, 6)[0] == 0
    frame = P.parse_binary_message(data)
    assert frame.image == IMG and frame.meta == P.FrameMeta()
    bare = P.parse_binary_message(IMG)  # no DA3F magic: the whole message is the image
    assert bare.image == IMG and bare.meta.frame_id is None
    assert P.parse_binary_message(P.encode_frame_message(IMG, {"frame_id": 7})).meta.frame_id == 7


def test_frame_meta_validated_on_the_client_side():
    with pytest.raises(ValueError):
        P.encode_frame_message(IMG, {"intrinsics": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError):
        P.encode_frame_message(b"", None)


@pytest.mark.parametrize("data,code", [
    (b"", ErrorCode.INVALID_MESSAGE),
    (b"DA3F\x01", ErrorCode.INVALID_MESSAGE),  # shorter than the prefix
    (raw_frame(b"{}", version=2), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b"{}", flags=1), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b"{}", hlen=500), ErrorCode.INVALID_MESSAGE),  # header_len beyond the message
    (raw_frame(b"{}", image=b""), ErrorCode.INVALID_MESSAGE),  # no image
    (raw_frame(b"{not json"), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b"\xff\xfe{}"), ErrorCode.INVALID_MESSAGE),  # not UTF-8
    (raw_frame(b"[1, 2]"), ErrorCode.INVALID_MESSAGE),  # not an object
    (raw_frame(b'{"frame_id": -1}'), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b'{"frame_id": true}'), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b'{"frame_id": 1.5}'), ErrorCode.INVALID_MESSAGE),
    (raw_frame(json.dumps({"frame_id": "x" * 65}).encode()), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b'{"timestamp": "now"}'), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b'{"timestamp": NaN}'), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b'{"timestamp": Infinity}'), ErrorCode.INVALID_MESSAGE),
    (raw_frame(b'{"intrinsics": [[1,0,0],[0,1,0]]}'), ErrorCode.INVALID_PRIOR),
    (raw_frame(b'{"intrinsics": [[0,0,0],[0,0,0],[0,0,1]]}'), ErrorCode.INVALID_PRIOR),  # zero focal
    (raw_frame(json.dumps({"pose": [r[:3] for r in POSE]}).encode()), ErrorCode.INVALID_PRIOR),
    (raw_frame(json.dumps({"pose": POSE[:3] + [[0, 0, 1, 1]]}).encode()), ErrorCode.INVALID_PRIOR),
    (raw_frame(b"[" * 5000 + b"]" * 5000), ErrorCode.INVALID_MESSAGE),  # recursion bomb
    (raw_frame(b" " * 20000), ErrorCode.MESSAGE_TOO_LARGE),  # header over max_header_bytes
])
def test_malformed_binary_frames(data, code):
    assert code_of(P.parse_binary_message, data) == code


def test_unknown_header_keys_are_ignored():
    frame = P.parse_binary_message(raw_frame(b'{"frame_id": 3, "future_field": {"a": 1}}'))
    assert frame.meta.frame_id == 3


# --- text messages ---------------------------------------------------------------------------------------------
def test_text_messages_parse():
    assert P.parse_text_message('{"type":"flush"}', max_bytes=1000).type == "flush"
    assert P.parse_text_message(b'{"type":"finalize"}', max_bytes=1000).type == "finalize"
    ping = P.parse_text_message('{"type":"ping","t":"1.5-abc"}', max_bytes=1000)
    assert ping.type == "ping" and ping.t == "1.5-abc"
    pong = P.msg_pong(ping.t)
    assert pong["type"] == "pong" and pong["t"] == "1.5-abc" and pong["server_time"] > 0
    assert P.parse_text_message('{"type":"ping","t":7}', max_bytes=1000).t == 7
    msg = P.parse_text_message(json.dumps({"type": "frame", "image": base64.b64encode(IMG).decode(),
                                           "frame_id": 4, "timestamp": 0.25, "intrinsics": K}), max_bytes=10000)
    frame = P.frame_from_json(msg)
    assert frame.image == IMG and frame.meta.frame_id == 4 and frame.meta.intrinsics == K
    data_url = "data:image/jpeg;base64," + base64.b64encode(IMG).decode()
    msg = P.parse_text_message(json.dumps({"type": "frame", "image": data_url}), max_bytes=10000)
    assert P.frame_from_json(msg).image == IMG


@pytest.mark.parametrize("text,code", [
    ("", ErrorCode.INVALID_MESSAGE),
    ("{", ErrorCode.INVALID_MESSAGE),
    ("[]", ErrorCode.INVALID_MESSAGE),
    ('"flush"', ErrorCode.INVALID_MESSAGE),
    ('{"kind":"flush"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"explode"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":5}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"frame"}', ErrorCode.INVALID_MESSAGE),  # no image
    ('{"type":"frame","image":5}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"frame","image":"aGk=","frame_id":-3}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ping","t":NaN}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ping","t":{"n":[1,2]}}', ErrorCode.INVALID_MESSAGE),  # a token echoed back: a small scalar only
    ('{"type":"ping","t":"' + "x" * 129 + '"}', ErrorCode.INVALID_MESSAGE),
    ('{"type":"ping","t":1e400}', ErrorCode.INVALID_MESSAGE),  # valid syntax, overflows to inf
    ('{"type":"received","seq":1e400}', ErrorCode.INVALID_MESSAGE),
    (b'{"type":"flush"}\xff', ErrorCode.INVALID_MESSAGE),  # invalid UTF-8
    ("{\"type\":\"flush\",\"x\":\"\ud800\"}", ErrorCode.INVALID_MESSAGE),  # lone surrogate
    ('{"type":"flush","pad":"' + "x" * 2000 + '"}', ErrorCode.MESSAGE_TOO_LARGE),
    (b'{"type":"flush","pad":"' + b"x" * 2000 + b'"}', ErrorCode.MESSAGE_TOO_LARGE),
    ('{"type":"flush","p":"' + "\u00e9" * 600 + '"}', ErrorCode.MESSAGE_TOO_LARGE),  # > 1000 bytes, < 1000 chars
])
def test_malformed_text_messages(text, code):
    assert code_of(P.parse_text_message, text, max_bytes=1000) == code


@pytest.mark.parametrize("image", ["not base64!!", "", "data:image/png;base64,"])
def test_bad_base64_image(image):
    msg = P.parse_text_message(json.dumps({"type": "frame", "image": image}), max_bytes=1000)
    assert code_of(P.frame_from_json, msg) == ErrorCode.INVALID_MESSAGE


# --- points ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding,tol", [("float16", 0.02), ("float32", 1e-5)])
@pytest.mark.parametrize("count", [0, 1, 5, 1000])
def test_points_round_trip(encoding, tol, count):
    rng = np.random.default_rng(count)
    pts = (rng.normal(size=(count, 3)) * 3 + [10.0, -4.0, 7.0]).astype(np.float32)
    cols = rng.integers(0, 256, size=(count, 3), dtype=np.uint8)
    data = P.encode_points(pts, cols, seq=3, window=2, frame_ids=[5, "b"], encoding=encoding)
    hlen = struct.unpack_from("<H", data, 6)[0]
    assert (8 + hlen) % 4 == 0  # positions start 4-byte aligned
    itemsize = 2 if encoding == "float16" else 4
    assert len(data) == 8 + hlen + count * (3 * itemsize + 3)
    assert data[5] == (P.ENC_FLOAT16 if encoding == "float16" else P.ENC_FLOAT32)
    chunk = P.decode_points(data)
    assert (chunk.seq, chunk.window, chunk.frame_ids, chunk.count) == (3, 2, [5, "b"], count)
    assert chunk.points.dtype == np.float32 and chunk.points.shape == (count, 3)
    assert chunk.colors.dtype == np.uint8 and np.array_equal(chunk.colors, cols)
    if count:
        assert np.allclose(chunk.points, pts, atol=tol, rtol=0)
        assert np.allclose(chunk.origin, pts.mean(axis=0), atol=1e-4)
    else:
        assert chunk.origin == (0.0, 0.0, 0.0)


def test_point_body_encoded_once_framed_per_record():
    """The worker encodes a record's points before the session actor assigns its seq; framing adds the header."""
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 3)).astype(np.float32)
    cols = rng.integers(0, 256, size=(50, 3), dtype=np.uint8)
    body = P.encode_point_body(pts, cols, "float16")
    assert (body.requested, body.encoding, body.count) == ("float16", P.ENC_FLOAT16, 50)
    for seq in (1, 12345):
        data = P.frame_points(body, seq=seq, window=7, frame_ids=[1, 2])
        assert data == P.encode_points(pts, cols, seq=seq, window=7, frame_ids=[1, 2], encoding="float16")
        assert P.decode_points(data).seq == seq
    far = P.encode_point_body(np.array([[0, 0, 0], [2e5, 0, 0]], np.float32), np.zeros((2, 3), np.uint8))
    assert (far.requested, far.encoding) == ("float16", P.ENC_FLOAT32)  # asked float16, fell back


def test_float16_origin_keeps_precision_far_from_zero():
    pts = np.array([[1000.0, 2000.0, -3000.0], [1000.5, 2000.25, -3000.125]], np.float32)
    chunk = P.decode_points(P.encode_points(pts, np.zeros((2, 3), np.uint8), seq=1, window=0, frame_ids=[]))
    assert chunk.encoding == P.ENC_FLOAT16
    assert np.abs(chunk.points - pts).max() < 1e-3  # absolute float16 would be off by ~1 unit here


def test_float16_overflow_falls_back_to_float32():
    pts = np.array([[0.0, 0.0, 0.0], [2e5, 0.0, 0.0]], np.float32)
    chunk = P.decode_points(P.encode_points(pts, np.zeros((2, 3), np.uint8), seq=1, window=0, frame_ids=[]))
    assert chunk.encoding == P.ENC_FLOAT32 and np.allclose(chunk.points, pts)


def test_points_header_padding_for_every_length():
    # Header length varies with the frame id text; the prefix+header must always end 4-byte aligned.
    for n in range(12):
        data = P.encode_points(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.uint8), seq=1, window=0,
                               frame_ids=["x" * n])
        assert (8 + struct.unpack_from("<H", data, 6)[0]) % 4 == 0
        assert P.decode_points(data).frame_ids == ["x" * n]


@pytest.mark.parametrize("mutate", [
    lambda d: d[:-1],  # truncated
    lambda d: d + b"\0",  # trailing byte
    lambda d: b"XXXX" + d[4:],
    lambda d: d[:4] + b"\x09" + d[5:],  # version
    lambda d: d[:5] + b"\x07" + d[6:],  # encoding
    lambda d: d[:6] + struct.pack("<H", 60000) + d[8:],
])
def test_decode_points_rejects_malformed(mutate):
    data = P.encode_points(np.ones((4, 3), np.float32), np.ones((4, 3), np.uint8), seq=1, window=0,
                           frame_ids=[0])
    assert code_of(P.decode_points, mutate(data)) == ErrorCode.INVALID_MESSAGE


def test_encode_points_rejects_mismatch():
    with pytest.raises(ValueError):
        P.encode_points(np.zeros((2, 3)), np.zeros((3, 3), np.uint8), seq=1, window=0, frame_ids=[])
    with pytest.raises(ValueError):
        P.encode_points(np.zeros((2, 3)), np.zeros((2, 3), np.uint8), seq=1, window=0, frame_ids=[],
                        encoding="int8")


# --- server messages -------------------------------------------------------------------------------------------
def test_server_message_helpers_are_json():
    msgs = [
        P.msg_ready(session_id="s", params={}, state="created", frames_received=0, frames_processed=0,
                    points_total=0, last_seq=0, max_in_flight=8, in_flight=0),
        P.msg_ack("f", 3, in_flight=2, max_in_flight=8),
        P.msg_error(ErrorCode.QUEUE_FULL, "full", frame_id=9),
        P.msg_error("INVALID_IMAGE", "bad"),
        P.msg_progress(frames_received=4, frames_processed=2, in_flight=2, windows_pending=1),
        P.msg_window(2, {"window": 1, "frame_ids": [4, 5]}),
        P.msg_frame_result(2, {"frame_id": 4, "index": 4}),
        P.msg_summary("s", frames_received=4, frames_processed=4, points_total=10, windows=2, duration_s=1.5),
    ]
    for m in msgs:
        assert json.loads(json.dumps(m)) == m
    assert msgs[1]["frames_received"] == 4
    assert msgs[2] == {"type": "error", "code": "QUEUE_FULL", "message": "full", "fatal": False, "frame_id": 9}
    assert "frame_id" not in msgs[3]
    assert msgs[7]["exports"]["ply"] == "/ws/session/s/reconstruction.ply"
    with pytest.raises(ValueError):
        P.msg_error("NOT_A_CODE", "x")


# --- properties: nothing but ServiceError escapes --------------------------------------------------------------
_header_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
_headers = st.dictionaries(st.sampled_from(["frame_id", "timestamp", "intrinsics", "pose", "x"]), _header_values,
                           max_size=4)


def _parse_binary_or_service_error(data: bytes) -> None:
    try:
        frame = P.parse_binary_message(data)
    except ServiceError as exc:
        assert exc.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.INVALID_PRIOR)
        assert not exc.fatal
    else:
        assert isinstance(frame.image, bytes) and frame.image


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_arbitrary_bytes(data):
    _parse_binary_or_service_error(data)
    _parse_binary_or_service_error(b"DA3F" + data)
    _parse_binary_or_service_error(b"DA3F\x01\x00" + data)


@settings(max_examples=300, deadline=None)
@given(_headers, st.binary(max_size=20), st.integers(0, 70000))
@pytest.mark.slow
def test_property_structured_headers(header, image, hlen):
    body = json.dumps(header, allow_nan=True).encode()
    _parse_binary_or_service_error(raw_frame(body, image))
    _parse_binary_or_service_error(raw_frame(body, image, hlen=hlen & 0xFFFF))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.builds(lambda h, t: json.dumps({**h, "type": t}, allow_nan=True), _headers,
                           st.sampled_from(["frame", "flush", "finalize", "ping", "other"]))))
@pytest.mark.slow
def test_property_text_messages(text):
    try:
        msg = P.parse_text_message(text, max_bytes=200)
    except ServiceError as exc:
        assert exc.code in (ErrorCode.INVALID_MESSAGE, ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.INVALID_PRIOR)
        assert not exc.fatal
        return
    assert msg.type in P.CLIENT_TYPES
    if msg.type == "frame":
        try:
            P.frame_from_json(msg)
        except ServiceError as exc:
            assert exc.code == ErrorCode.INVALID_MESSAGE


def test_received_message_for_result_flow_control():
    assert P.parse_text_message('{"type":"received","seq":7}', max_bytes=1024).seq == 7
    for bad in ('{"type":"received"}', '{"type":"received","seq":-1}', '{"type":"received","seq":"7"}',
                '{"type":"received","seq":1.5}'):
        with pytest.raises(ServiceError) as ei:
            P.parse_text_message(bad, max_bytes=1024)
        assert ei.value.code is ErrorCode.INVALID_MESSAGE and not ei.value.fatal


# --- strict JSON and priors (docs/SECURITY.md, "Sessions, protocol and state") ---------------------------------
@pytest.mark.parametrize("raw", [b'{"voxel_size": Infinity}', b'{"voxel_size": NaN}', b'{"voxel_size": -Infinity}',
                                 b'{"voxel_size": 1e400}', b"[1]", b'"x"', b"{", b"\xff"])
def test_json_bodies_are_strict(raw):
    with pytest.raises(ServiceError) as ei:
        P.parse_json_object(raw)
    assert ei.value.code is ErrorCode.INVALID_PARAMS
    assert P.parse_json_object(b"  ") == {} and P.parse_json_object(b'{"voxel_size": 0.5}') == {"voxel_size": 0.5}


ROT = [[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("meta", [
    {"intrinsics": [[1e39, 0, 10], [0, 1e39, 10], [0, 0, 1]]},  # finite as float64, inf as the float32 used
    {"intrinsics": [[500, 0, 3.5e38], [0, 500, 10], [0, 0, 1]]},
    {"intrinsics": [[500, 0, 10], [0, 500, 10], [0, 1, 1]]},  # not a calibration matrix
    {"pose": [[1, 0, 0, 1e39], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]},
    {"pose": [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]},  # a scale, not a rotation
    {"pose": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]]},  # a reflection (det -1)
    {"pose": [[1, 0.01, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]},  # sheared
])
def test_unusable_priors_are_refused_per_frame(meta):
    for parse in (lambda m: P.parse_binary_message(raw_frame(json.dumps(m).encode())),
                  lambda m: P.parse_text_message(json.dumps({"type": "frame", "image": "aGk=", **m}),
                                                 max_bytes=10000)):
        with pytest.raises(ServiceError) as ei:
            parse({"frame_id": 7, **meta})
        assert ei.value.code is ErrorCode.INVALID_PRIOR and not ei.value.fatal
        assert ei.value.frame_id == 7 and ei.value.details["field"] in ("pose", "intrinsics")


def test_good_priors_pass_in_the_precision_clients_send():
    import numpy as np

    r = np.round(np.array(ROT), 6)
    c, s_ = np.cos(0.3), np.sin(0.3)
    tilted = [[1, 0, 0, 0], [0, round(c, 5), round(-s_, 5), 0], [0, round(s_, 5), round(c, 5), 0], [0, 0, 0, 1]]
    for pose in (r.tolist(), tilted):
        frame = P.parse_binary_message(raw_frame(json.dumps({"pose": pose, "intrinsics": K}).encode()))
        assert frame.meta.pose == pose
