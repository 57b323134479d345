"""The browser client (/) and operator dashboard (/dashboard) in a real headless Chromium against the real Serve app.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`, or .ci/install-chromium).
Screenshots go to artifacts/ (git-ignored) so a person can look at what the pages show.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.media.imaging import encode_image
from serve_app.protocol import encode_points, parse_binary_message
from serve_app.recon.exports import read_ply

pytestmark = pytest.mark.ray

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
N_FRAMES = 10
PARAMS = {"process_res": 154, "window_size": 4, "overlap": 2}
CLIENT_MAX_IN_FLIGHT = 5  # below the server's 12 so the client's flow control really has to wait
BACKGROUND = (16, 20, 26)  # the viewer's clear colour, #10141a


@pytest.fixture(scope="module")
def pw():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium with `apt-get install -y chromium` "
                    "(or run .ci/install-chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(pw):
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield b
    b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    pg = ctx.new_page()
    console_errors: list[str] = []
    pg.on("pageerror", lambda exc: console_errors.append(str(exc)))
    pg.console_errors = console_errors
    yield pg
    ctx.close()


def open_client(page, serve_url):
    page.goto(serve_url + "/")
    page.wait_for_function("() => window.da3 && window.da3.state")
    return page


def snapshot(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.da3.state))")


def data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_image(image, "PNG")).decode()


@pytest.fixture(scope="module")
def streamed(browser, serve_url, synthetic_seq):
    """Stream N_FRAMES synthetic frames through the page once; the tests below inspect the result."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = ctx.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    sent_text: list[str] = []  # text messages the page sent on its stream
    page.on("websocket", lambda sock: sock.on(
        "framesent", lambda payload: sent_text.append(payload) if isinstance(payload, str) else None))
    open_client(page, serve_url)
    urls = [data_url(synthetic_seq.images[i]) for i in range(N_FRAMES)]
    page.evaluate("([urls, params, opts]) => { window.__run = window.da3.streamUrls(urls, params, opts)"
                  ".then(() => 'ok', (e) => String(e)); }", [urls, PARAMS, {"maxInFlight": CLIENT_MAX_IN_FLIGHT}])
    page.wait_for_function("() => ['complete', 'failed'].includes(window.da3.state.status)", timeout=300_000)
    outcome = page.evaluate("() => window.__run")
    state = snapshot(page)
    yield {"page": page, "state": state, "outcome": outcome, "page_errors": page_errors, "sent_text": sent_text}
    ctx.close()


def drawn_pixels(png: bytes) -> int:
    """Pixels that differ clearly from the view's clear colour (checked to be what fills the image)."""
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    differs = np.abs(img - np.array(BACKGROUND)).sum(axis=2) > 40
    assert differs.mean() < 0.5, "the 3D view is not showing its clear colour"
    return int(differs.sum())


def test_client_streams_and_renders_point_cloud(streamed, serve_url):
    page, state = streamed["page"], streamed["state"]
    assert streamed["outcome"] == "ok", (streamed["outcome"], state["errors"])
    assert state["status"] == "complete" and state["errors"] == [] and streamed["page_errors"] == []
    assert state["framesSent"] == state["framesAcked"] == state["framesProcessed"] == N_FRAMES
    assert state["framesRejected"] == state["framesLost"] == state["framesFailed"] == 0
    # Result flow control: one `received` per points message, in seq order.
    received = [json.loads(t)["seq"] for t in streamed["sent_text"] if '"received"' in t]
    assert received == list(range(1, state["windows"] + 1)), received
    # Flow control: the first window needs window_size frames outstanding; never more than the limit.
    assert PARAMS["window_size"] <= state["maxOutstanding"] <= CLIENT_MAX_IN_FLIGHT
    assert page.evaluate("() => window.da3.pendingFrames") == 0

    summary = state["summary"]
    assert summary["frames_processed"] == N_FRAMES and summary["state"] == "complete"
    history = state["pointsHistory"]
    assert len(history) == state["windows"] == summary["windows"] >= 2
    assert all(b > a for a, b in itertools.pairwise(history)), history  # grows with every window
    assert state["pointsRendered"] == history[-1] == summary["points_total"] > 0
    assert page.evaluate("() => [...window.da3.viewer.windows.values()].flatMap((w) => w.chunks)"
                         ".reduce((n, c) => n + (c.object ? c.object.geometry.attributes.position.count : 0),"
                         " 0)"
                         ) == state["pointsRendered"]  # what the per-window points objects draw
    assert state["frustums"] == N_FRAMES
    assert state["latencyP50"] > 0

    # What the page shows matches its state.
    assert page.inner_text("#status") == "complete"
    assert page.inner_text("#st-processed") == str(N_FRAMES)
    assert page.inner_text("#st-points").replace(",", "") == str(state["pointsRendered"])

    # The Download PLY button fetches the server's export: the same points the page rendered.
    with page.expect_download() as dl:
        page.click("#dl-ply")
    pts, cols = read_ply(Path(dl.value.path()).read_bytes())
    assert len(pts) == state["pointsRendered"] and cols.dtype == np.uint8
    rendered = page.evaluate("() => Array.from(window.da3.viewer.worldPositions())")
    rendered = np.asarray(rendered, np.float32).reshape(-1, 3)
    # float16 offsets from each chunk's origin on the wire vs the float32 export
    assert np.abs(np.sort(pts, axis=0) - np.sort(rendered, axis=0)).max() < 0.05 * (1 + np.abs(pts).max())

    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("() => document.getElementById('panel').scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "web_client.png"))
    if state["webgl"]:
        # Points and frustums were drawn over the clear colour.
        assert drawn_pixels(page.locator("#view").screenshot()) > 500
    else:
        assert page.is_visible("#notice")


def test_dashboard_shows_session_and_batches(streamed, browser, serve_url):
    sid = streamed["state"]["sessionId"]
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    try:
        page.goto(serve_url + "/dashboard")
        row = page.locator(f'tr[data-session-id="{sid}"]')
        row.wait_for(timeout=30_000)
        assert "complete" in row.inner_text() and str(N_FRAMES) in row.inner_text()
        page.wait_for_selector(".hist-bar")
        shown = {int(x) for x in page.eval_on_selector_all(".hist-bar", "els => els.map(e => e.dataset.size)")}
        stats = httpx.get(serve_url + "/stats", timeout=30).json()
        assert shown and shown <= {int(k) for k in stats["model"]["batch_sizes"]}
        deployments = page.eval_on_selector_all("#deployments tr[data-deployment]",
                                                "els => els.map(e => e.dataset.deployment)")
        assert set(deployments) == set(stats["deployments"]) and len(deployments) >= 2
        assert page.evaluate("() => window.da3dash.polls") >= 1 and page.evaluate("() => window.da3dash.error") is None
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # The token field is sent as a Bearer header on the next poll.
        with page.expect_request(lambda r: r.url.endswith("/stats")
                                 and r.headers.get("authorization") == "Bearer operator-key"):
            page.fill("#token", "operator-key")
            page.dispatch_event("#token", "change")
    finally:
        ctx.close()


def test_page_protocol_codec_matches_server(page, serve_url):
    """The page's DA3P decoder and DA3F encoder against serve_app.protocol, both float encodings."""
    open_client(page, serve_url)
    rng = np.random.default_rng(0)
    pts = (rng.normal(size=(257, 3)) * [2.0, 0.5, 30.0] + [1.0, -3.0, 100.0]).astype(np.float32)
    cols = rng.integers(0, 256, size=(257, 3), dtype=np.uint8)
    for encoding, tol in (("float16", 0.05), ("float32", 1e-4)):
        msg = encode_points(pts, cols, seq=3, window=2, frame_ids=["a", 1], encoding=encoding)
        for native in (True, False):
            out = page.evaluate(
                """([b64, native]) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const c = window.da3.protocol.decodePoints(bytes.buffer, {useNativeFloat16: native});
                    return {header: c.header, positions: Array.from(c.positions), colors: Array.from(c.colors)};
                }""", [base64.b64encode(msg).decode(), native])
            assert out["header"]["count"] == 257 and out["header"]["frame_ids"] == ["a", 1]
            np.testing.assert_allclose(np.reshape(out["positions"], (-1, 3)), pts, atol=tol)
            assert np.array_equal(np.reshape(out["colors"], (-1, 3)), cols)
    assert page.evaluate("() => [0x3c00, 0xc000, 0x0001, 0x7c00].map(window.da3.protocol.halfToFloat)") == [
        1.0, -2.0, 2.0 ** -24, float("inf")]
    with pytest.raises(Exception, match="not a DA3P"):
        page.evaluate("() => window.da3.protocol.decodePoints(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]).buffer)")

    frame = page.evaluate("""() => Array.from(new Uint8Array(window.da3.protocol.encodeFrame(
        new Uint8Array([255, 216, 255, 1, 2]), {frame_id: 'cam-7', timestamp: 1.25})))""")
    parsed = parse_binary_message(bytes(frame))
    assert parsed.image == bytes([255, 216, 255, 1, 2])
    assert parsed.meta.frame_id == "cam-7" and parsed.meta.timestamp == 1.25
    assert page.console_errors == []


def test_create_error_is_shown_with_its_code(page, serve_url):
    open_client(page, serve_url)
    outcome = page.evaluate("() => window.da3.streamUrls(['data:,'], {window_size: 4, overlap: 9})"
                            ".then(() => 'ok', (e) => String(e))")
    assert "INVALID_PARAMS" in outcome
    state = snapshot(page)
    assert state["status"] == "failed" and [e["code"] for e in state["errors"]] == ["INVALID_PARAMS"]
    assert "overlap" in state["errors"][0]["message"]
    assert "INVALID_PARAMS" in page.inner_text("#errors") and page.inner_text("#error-count") == "1"


def test_webcam_source_streams_with_flow_control(pw, serve_url):
    """getUserMedia with Chromium's fake camera: real-time capture drops frames instead of exceeding the limit."""
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
    try:
        page = b.new_page()
        open_client(page, serve_url)
        page.evaluate("(p) => { window.da3.start(window.da3.webcamSource(8), p, {autoFinalize: false, "
                      "maxInFlight: 4}).catch(() => {}); }", PARAMS)
        page.wait_for_function("() => window.da3.state.framesProcessed >= 4 || window.da3.state.status === "
                               "'failed'", timeout=120_000)
        page.evaluate("() => window.da3.finalize().catch(() => {})")
        page.wait_for_function("() => ['complete', 'failed'].includes(window.da3.state.status)", timeout=120_000)
        state = snapshot(page)
    finally:
        b.close()
    assert state["status"] == "complete" and state["errors"] == [], state["errors"]
    assert state["framesSent"] >= 4 and state["framesProcessed"] == state["framesAcked"] == state["framesSent"]
    assert state["maxOutstanding"] <= 4 and state["pointsRendered"] == state["summary"]["points_total"] > 0


# --- where the key goes ------------------------------------------------------------------------------------
class _Recorder(BaseHTTPRequestHandler):
    """Another origin that would gladly take the key: answers every CORS preflight with yes, records requests."""

    seen: ClassVar[list[dict]] = []

    def _answer(self, status: int, body: bytes = b"{}") -> None:
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "authorization, content-type")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.seen.append({"method": self.command, "path": self.path,
                          "authorization": self.headers.get("Authorization")})

    def do_OPTIONS(self):
        self._record()
        self._answer(204, b"")

    def do_GET(self):
        self._record()
        self._answer(200)

    def do_POST(self):
        self._record()
        self._answer(503, b'{"error": {"code": "MODEL_UNAVAILABLE", "message": "elsewhere"}}')

    def log_message(self, *args):
        pass


@pytest.fixture
def elsewhere():
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Rec", (_Recorder,), {"seen": []}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.RequestHandlerClass.seen
    server.shutdown()


def _page_with_stored_key(browser, base_url: str, key: str, answer: bool):
    """A page context whose localStorage holds `key` for base_url's origin; confirm() dialogs get `answer`."""
    ctx = browser.new_context()
    page = ctx.new_page()
    dialogs: list[str] = []

    def on_dialog(d):
        dialogs.append(d.message)
        d.accept() if answer else d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(base_url + "/static/style.css")  # same origin, no script: just to reach its localStorage
    page.evaluate("(k) => localStorage.setItem('da3.token', k)", key)
    return ctx, page, dialogs


def test_pages_send_the_key_to_another_origin_only_after_confirm(browser, serve_url, elsewhere):
    """`/dashboard?url=<elsewhere>` and `/?url=<elsewhere>` must not hand the stored key to that origin unless the
    user confirms a dialog naming it (asked once per origin); the page's own origin gets it without asking."""
    other, seen = elsewhere
    ctx, page, dialogs = _page_with_stored_key(browser, serve_url, "stored-secret", answer=False)
    try:
        page.goto(f"{serve_url}/dashboard?url={other}")
        page.wait_for_function("() => window.da3dash.polls + window.da3dash.failures >= 2", timeout=30_000)
        page.goto(f"{serve_url}/?url={other}")
        page.wait_for_function("() => window.da3 && window.da3.state")
        out = page.evaluate("(u) => window.da3.streamUrls([u], {}).then(() => 'ok', (e) => String(e))",
                            data_url(np.zeros((32, 32, 3), np.uint8)))
        assert "MODEL_UNAVAILABLE" in out  # it did talk to that origin, just without the key
    finally:
        ctx.close()
    assert {r["path"] for r in seen} >= {"/stats", "/ws/session/create"}
    assert all(r["authorization"] is None for r in seen), seen
    # Asked once for the tab (not on every poll, not again on the other page), naming the origin.
    assert len(dialogs) == 1 and other in dialogs[0], dialogs

    seen.clear()
    ctx, page, dialogs = _page_with_stored_key(browser, serve_url, "stored-secret", answer=True)
    try:
        with page.expect_request(lambda r: r.url == f"{serve_url}/stats"
                                 and r.headers.get("authorization") == "Bearer stored-secret"):
            page.goto(f"{serve_url}/dashboard")  # own origin: no question asked
        assert dialogs == []
        page.goto(f"{serve_url}/dashboard?url={other}")
        page.wait_for_function("() => window.da3dash.polls >= 2", timeout=30_000)
    finally:
        ctx.close()
    assert len(dialogs) == 1 and other in dialogs[0]
    assert any(r["authorization"] == "Bearer stored-secret" for r in seen if r["path"] == "/stats"), seen


def test_stream_key_travels_as_a_subprotocol_not_in_the_url(browser, secure_url, synthetic_seq):
    """On an app with API keys: the page streams with the key in Sec-WebSocket-Protocol (through Ray Serve's
    proxy), the server answers da3.v1 only, and no URL the page requests holds the key."""
    ctx = browser.new_context()
    page = ctx.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    cdp = ctx.new_cdp_session(page)
    cdp.send("Network.enable")
    handshakes: list[dict] = []
    answers: list[dict] = []
    cdp.on("Network.webSocketWillSendHandshakeRequest", lambda e: handshakes.append(e))
    cdp.on("Network.webSocketHandshakeResponseReceived", lambda e: answers.append(e))
    cdp.on("Network.webSocketCreated", lambda e: urls.append(e["url"]))
    try:
        page.goto(secure_url + "/")
        page.wait_for_function("() => window.da3 && window.da3.state")
        page.fill("#token", "key-alice")
        page.dispatch_event("#token", "change")
        frames = [data_url(synthetic_seq.images[i]) for i in range(4)]  # within the app's 2 frames/s burst
        out = page.evaluate("([u, p]) => window.da3.streamUrls(u, p).then(() => 'ok', (e) => String(e))",
                            [frames, PARAMS])
        state = snapshot(page)
        assert out == "ok" and state["status"] == "complete", (out, state["errors"])
        assert state["framesProcessed"] == 4
    finally:
        ctx.close()
    assert handshakes and answers
    for h in handshakes:
        sent = {k.lower(): v for k, v in h["request"]["headers"].items()}
        assert sent["sec-websocket-protocol"] == "da3.v1, bearer.key-alice"
    for a in answers:
        got = {k.lower(): v for k, v in a["response"]["headers"].items()}
        assert got["sec-websocket-protocol"] == "da3.v1" and "key-alice" not in json.dumps(got)
    assert any("/ws/reconstruct/" in u for u in urls)
    assert not [u for u in urls if "key-alice" in u or "token=" in u], urls


def test_dashboard_data_needs_an_operator_key(browser, secure_url):
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        page.goto(secure_url + "/dashboard")
        page.fill("#token", "key-alice")
        page.dispatch_event("#token", "change")
        page.wait_for_function("() => (window.da3dash.error || '').includes('FORBIDDEN')", timeout=30_000)
        assert "FORBIDDEN" in page.inner_text("#dash-error")
        page.fill("#token", "key-operator")
        page.dispatch_event("#token", "change")
        page.wait_for_function("() => window.da3dash.error === null && window.da3dash.polls >= 1", timeout=30_000)
        page.wait_for_selector("#deployments tr[data-deployment]")
    finally:
        ctx.close()
