"""HTTP side of the client: session routes, exports, health."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import httpx

from da3_client.errors import Da3Error
from da3_client.stream import StreamSession

EXPORTS = {"ply": "reconstruction.ply", "glb": "reconstruction.glb", "trajectory": "trajectory.json",
           "tum": "trajectory.txt"}


def _error_from_response(resp: httpx.Response) -> Da3Error:
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and "code" in err:
        return Da3Error(str(err["code"]), str(err.get("message", "")), resp.status_code,
                        details=err.get("details"))
    text = resp.text[:200] if resp.content else resp.reason_phrase
    return Da3Error(f"HTTP_{resp.status_code}", text, resp.status_code)


class Da3Client:
    """Async client for a da3-serve deployment.

    >>> async with Da3Client("http://127.0.0.1:8000") as client:
    ...     info = await client.create_session(window_size=6)
    ...     async with client.stream(info["session_id"]) as s:
    ...         await s.send_frame(jpeg_bytes)
    ...         summary = await s.finalize()

    Every HTTP error raises `Da3Error(code, message, status)` with the server's error code.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._http: httpx.AsyncClient | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout)
        return self._http

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = await self._client().request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise Da3Error("TIMEOUT", f"{method} {path}: {exc!r}") from exc
        except httpx.HTTPError as exc:
            raise Da3Error("CONNECTION_ERROR", f"{method} {self.url}{path}: {exc!r}") from exc
        if resp.status_code >= 400:
            raise _error_from_response(resp)
        return resp

    # --- sessions -------------------------------------------------------------------------------------------
    async def create_session(self, **params: Any) -> dict:
        """POST /ws/session/create with the given session params (None values are left to the server)."""
        body = {k: v for k, v in params.items() if v is not None}
        return (await self._request("POST", "/ws/session/create", json=body)).json()

    async def get_session(self, session_id: str) -> dict:
        return (await self._request("GET", f"/ws/session/{session_id}")).json()

    async def delete_session(self, session_id: str) -> None:
        await self._request("DELETE", f"/ws/session/{session_id}")

    async def list_sessions(self) -> dict:
        return (await self._request("GET", "/ws/sessions")).json()

    async def healthz(self) -> dict:
        """GET /healthz; a 503 (model or session store unavailable) raises Da3Error(MODEL_UNAVAILABLE)."""
        try:
            resp = await self._client().get("/healthz")
        except httpx.HTTPError as exc:
            raise Da3Error("CONNECTION_ERROR", f"GET {self.url}/healthz: {exc!r}") from exc
        if resp.status_code == 503:
            body = resp.json() if resp.content else {}
            raise Da3Error("MODEL_UNAVAILABLE", str(body.get("error", "service unavailable")), 503)
        if resp.status_code >= 400:
            raise _error_from_response(resp)
        return resp.json()

    async def download(self, session_id: str, kind: str, path: str | Path) -> Path:
        """Save an export ("ply", "trajectory", or "glb" / "tum" where the server offers them) to `path`."""
        if kind not in EXPORTS:
            raise ValueError(f"kind must be one of {sorted(EXPORTS)}")
        url = f"/ws/session/{session_id}/{EXPORTS[kind]}"
        path = Path(path)
        try:
            async with self._client().stream("GET", url) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise _error_from_response(resp)
                with path.open("wb") as fh:  # noqa: ASYNC230 - a local file, written as the download arrives
                    async for block in resp.aiter_bytes():
                        fh.write(block)
        except httpx.HTTPError as exc:
            raise Da3Error("CONNECTION_ERROR", f"GET {self.url}{url}: {exc!r}") from exc
        return path

    # --- streaming ------------------------------------------------------------------------------------------
    def websocket_url(self, session_id: str, resume_from: int | None = None) -> str:
        """The stream's URL; it never holds the key (that goes in `headers`, see StreamSession)."""
        base = "ws" + self.url[4:] if self.url.startswith("http") else self.url
        url = f"{base}/ws/reconstruct/{session_id}"
        return url + (f"?resume_from={int(resume_from)}" if resume_from is not None else "")

    def stream(self, session_id: str, **kwargs: Any) -> StreamSession:
        """A StreamSession; use as `async with client.stream(session_id) as s:` (kwargs: see StreamSession)."""
        return StreamSession(self, session_id, **kwargs)
