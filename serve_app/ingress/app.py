"""The ingress's FastAPI app, built per application from its args (a factory: no module-global app that each
replica changes). Routes are a table of (method, path, handler name); each replica builds its app with the routes
bound to its own methods (the rooms of serve_app/deployments/ingress.py), so FastAPI sees plain callables."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from serve_app.config import AppArgs
from serve_app.errors import ServiceError
from serve_app.ingress.auth import AccessMiddleware, AccessPolicy

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# (HTTP method or "WS", path, handler name, add_api_route keyword arguments)
ROUTES: list[tuple[str, str, str, dict]] = [
    ("POST", "/ws/session/create", "create_session", {"status_code": 201}),
    ("GET", "/ws/session/{session_id}", "get_session", {}),
    ("DELETE", "/ws/session/{session_id}", "delete_session", {"status_code": 204}),
    ("GET", "/ws/sessions", "list_sessions", {}),
    ("GET", "/ws/session/{session_id}/reconstruction.ply", "export_ply", {}),
    ("GET", "/ws/session/{session_id}/reconstruction.glb", "export_glb", {}),
    ("GET", "/ws/session/{session_id}/trajectory.json", "export_trajectory", {}),
    ("GET", "/ws/session/{session_id}/trajectory.txt", "export_tum", {}),
    ("POST", "/v1/reconstruct", "reconstruct_upload", {}),
    ("GET", "/healthz", "healthz", {}),
    ("GET", "/stats", "stats", {}),
    ("GET", "/", "index", {}),
    ("GET", "/dashboard", "dashboard", {}),
    ("WS", "/ws/reconstruct/{session_id}", "reconstruct", {}),
]


async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
    retry = exc.details.get("retry_after_s") if exc.details else None
    headers = {"Retry-After": str(max(1, int(-(-float(retry) // 1))))} if retry else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status, headers=headers)


def make_api(handlers: object, args: AppArgs, policy: AccessPolicy | None = None) -> FastAPI:
    """The app of one replica: static files, the error handler, CORS (if configured) and the access policy
    (outermost: Host, client and Origin are checked first), and ROUTES bound to `handlers`' methods."""
    api = FastAPI(title="da3-serve", version="0.1.0",
                  description="Real-time 3D reconstruction with Depth Anything 3. Protocol: docs/WEBSOCKET_API.md")
    api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    api.add_exception_handler(ServiceError, service_error)
    for method, path, name, kwargs in ROUTES:
        endpoint = getattr(handlers, name)
        if method == "WS":
            api.add_api_websocket_route(path, endpoint)
        else:
            api.add_api_route(path, endpoint, methods=[method], **kwargs)
    if args.cors_origins:
        api.add_middleware(CORSMiddleware, allow_origins=args.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    api.add_middleware(AccessMiddleware, policy=policy or AccessPolicy(args.auth, args.cors_origins))
    return api
