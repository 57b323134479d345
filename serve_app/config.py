"""Typed configuration: the app builder's args and the per-session parameters.

Everything here is plain pydantic so it is validated at `serve run` time and unit-tested without Ray.
Every limit the service enforces is a field here with a sane default.

Over 400 lines on purpose: it is the one declaration of every configurable value, each with its comment.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from serve_app.errors import ErrorCode, ServiceError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionParams(_Strict):
    """What a client may choose per session (POST /ws/session/create body); defaults come from the app config."""

    # NaN/Infinity are never a parameter (a non-finite voxel_size once created a session the 500 never named).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    process_res: int = Field(504, ge=140, le=1008, description="longest side fed to the model (px)")
    window_size: int = Field(6, ge=2, le=32, description="views per model window (context + new)")
    overlap: int = Field(2, ge=1, le=31, description="context views carried from earlier windows")
    conf_percentile: float = Field(40.0, ge=0.0, lt=100.0, description="drop points below this confidence pct")
    voxel_size: float | None = Field(None, gt=0.0, le=1e4,
                                     description="world units; null = auto from first window")
    max_points_per_frame: int = Field(20000, ge=100, le=1_000_000)
    max_points: int = Field(2_000_000, ge=1000, le=50_000_000, description="session point budget")
    max_frames: int = Field(10000, ge=1, le=1_000_000)
    idle_ttl_s: float = Field(600.0, gt=0, le=7 * 86400)
    ttl_s: float = Field(3600.0, gt=0, le=30 * 86400)
    point_encoding: Literal["float16", "float32"] = "float16"
    keyframe_translation: float = Field(0.05, ge=0.0, le=10.0, description="keyframe when the camera moved this "
                                        "fraction of the scene's median depth since the last keyframe ...")
    keyframe_rotation_deg: float = Field(5.0, ge=0.0, le=180.0, description="... or turned this many degrees")
    context_reach_windows: int = Field(2, ge=0, le=64, description="the keyframe context views come from at "
                                       "least this many windows' worth of new frames back: each window is then "
                                       "tied to older geometry, not only the previous window (0 = the newest "
                                       "keyframes)")
    global_consistency: bool = Field(False, description="keyframe pose graph, online loop closure and global "
                                     "re-optimisation of the map (corrections streamed to clients); off = "
                                     "each window is only chained onto the previous ones")
    # Global consistency (global_consistency: true): pose graph and loop closure (serve_app/recon/posegraph.py, loops.py).
    graph_local_windows: int = Field(8, ge=1, le=1000, description="newest windows re-optimised after each window")
    graph_sigma_rot_deg: float = Field(1.0, gt=0, description="pose-graph edge rotation std (degrees)")
    graph_sigma_trans: float = Field(0.02, gt=0, description="pose-graph edge translation std (x median depth)")
    graph_sigma_scale: float = Field(0.02, gt=0, description="pose-graph edge log-scale std")
    loop_min_similarity: float = Field(0.9, ge=-1.0, le=1.0, description="descriptor cosine for a loop candidate")
    loop_min_gap: int = Field(30, ge=1, description="frames between a keyframe and a loop candidate, at least")
    loop_query_interval: int = Field(2, ge=1, description="keyframes between two loop queries, at least")
    loop_min_inlier_ratio: float = Field(0.7, ge=0.0, le=1.0, description="loop verification: Sim(3) inliers")
    loop_max_rel_rmse: float = Field(0.05, gt=0, description="loop verification: inlier RMSE / median depth")
    loop_min_overlap: float = Field(0.3, ge=0.0, le=1.0, description="loop verification: fraction of the query "
                                    "keyframe's points seen by the candidate at a consistent depth")
    loop_max_discrepancy: float = Field(100.0, gt=0, description="loop verification: squared whitened "
                                        "disagreement with the current estimate per window between the two ends")
    loop_edge_at_cameras: bool = Field(True, description="loop edge: each loop view's camera centre mapped onto its "
                                       "earlier prediction, only the scale from the points (false = translation "
                                       "from the points too, which a depth warp in the loop window biases)")
    loop_edge_weight: float = Field(4.0, gt=0, le=100.0, description="information of a loop edge relative to a "
                                    "well-aligned odometry edge: a window's odometry edges come from the same depth "
                                    "(its errors count once per edge), so the chain is stiffer than its errors")
    loop_max_keyframes: int = Field(300, ge=0, description="keyframes kept as loop candidates (oldest dropped; "
                                    "each holds its model-size image)")
    loop_batch: int = Field(4, ge=1, le=64, description="loop candidates verified together: sent to the model "
                            "in one call (one batched forward), then one global solve for those accepted")
    loop_snapshot_keyframes: int = Field(64, ge=0, le=1000, description="loop keyframes (model-size JPEG image "
                                         "and depth sample) the session snapshot carries, so a replica taking the "
                                         "session over can still verify loops to them; spread over the session "
                                         "(thinned by halving when full); 0 = none")
    multiview_depth_tol: float = Field(0.1, ge=0.0, le=1.0, description="with global_consistency: a map point "
                                       "agrees with another view of its window that sees it at a depth within "
                                       "this fraction (0 = no multi-view check or fusion; serve_app/recon/fusion.py)")
    multiview_views: int = Field(1, ge=1, le=31, description="multi-view check: the views of the window at most "
                                 "this many places before and after a map point's view are compared with it")
    multiview_min_agree: int = Field(1, ge=0, le=62, description="multi-view check: a map point needs this many "
                                     "agreeing views (0: only a point that some view sees and none agrees with "
                                     "is dropped)")
    multiview_fuse: bool = Field(True, description="multi-view check: a kept map point is the mean of its own and "
                                 "the agreeing views' estimates (their depth along their ray through it)")
    # Multi-view depth refinement (serve_app/recon/depth_refine.py), before a window is placed.
    depth_refine: Literal["off", "field", "field+poses"] = Field(
        "field", description="fit each view's low-order depth field (tilt + bowl) and optionally small per-view pose "
        "corrections so the window's views agree with each other, before placement")
    depth_refine_samples: int = Field(100, ge=20, le=20000, description="depth refinement: pixels per view")
    depth_refine_max_gap: int | None = Field(3, ge=1, le=1000, description="depth refinement: compare views at most this "
                                             "many frames apart (null = every pair of the window)")
    depth_refine_prior: float = Field(0.02, gt=0, le=1.0, description="depth refinement: prior std of each field "
                                      "coefficient (log depth)")

    @field_validator("overlap")
    @classmethod
    def _overlap_below_window(cls, v: int, info: ValidationInfo) -> int:
        window = info.data.get("window_size")
        if window is not None and v >= window:
            raise ValueError(f"must be smaller than window_size ({window})")
        return v

    @property
    def new_per_window(self) -> int:
        return self.window_size - self.overlap


def merge_session_params(defaults: SessionParams, overrides: dict[str, Any] | None,
                         max_process_res: int | None = None, limits: LimitsConfig | None = None
                         ) -> SessionParams:
    """Client overrides on top of the server defaults; raises INVALID_PARAMS naming the field. With `limits`,
    the server's caps (max_points, ttl_s, idle_ttl_s) apply too: clients may only lower them."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise ServiceError(ErrorCode.INVALID_PARAMS, "session params must be a JSON object")
    try:
        params = SessionParams.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ServiceError(ErrorCode.INVALID_PARAMS, f"{field}: {first.get('msg')}",
                           details={"field": field, "errors": exc.errors(include_url=False, include_input=False,
                                                                 include_context=False)})
    if max_process_res is not None and params.process_res > max_process_res:
        raise ServiceError(ErrorCode.INVALID_PARAMS,
                           f"process_res: at most {max_process_res} on this server",
                           details={"field": "process_res"})
    if limits is not None:
        for field, cap in session_caps(limits).items():
            if getattr(params, field) > cap:
                raise ServiceError(ErrorCode.INVALID_PARAMS, f"{field}: at most {cap:g} on this server",
                                   details={"field": field, "max": cap})
    return params


def session_caps(limits: LimitsConfig) -> dict[str, float]:
    """Session parameters the server caps (LimitsConfig field per SessionParams field)."""
    return {"max_points": limits.max_session_points, "ttl_s": limits.max_session_ttl_s,
            "idle_ttl_s": limits.max_session_idle_ttl_s}


# Named error models for the oracle backend (model.oracle_errors: "<name>" or {"preset": "<name>", ...overrides}).
ORACLE_ERROR_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # white per-pixel noise, pixel outliers; the confidence knows the noise
    "white": {"pixel_noise": 0.02, "outliers": 0.01, "outlier_shape": "pixels", "conf_informative": 1.0},
    # shaped like a feed-forward model's errors: low-frequency per-view warp, pose errors, confident outlier blobs,
    # a confidence only weakly related to the error
    "realistic": {"depth_warp": 0.03, "pixel_noise": 0.01, "outliers": 0.01, "outlier_shape": "blobs",
                  "pose_noise_deg": 0.5, "conf_informative": 0.3},
}


class OracleErrors(_Strict):
    """Errors the oracle backend adds to each window's ground truth (serve_app/model/oracle.py). Drawn per window from
    `model.oracle_seed` and the window's frame indices, so independent of batching. A string is a preset name;
    a dict with `preset` takes the preset's values for the fields it does not give."""

    preset: Literal["none", "white", "realistic"] | None = None
    depth_warp: float = Field(0.0, ge=0.0, le=0.5, description="per-view low-frequency multiplicative depth warp "
                              "(planar tilt + radial bowl): std of the factor over pixels and views")
    pixel_noise: float = Field(0.0, ge=0.0, le=0.5, description="relative per-pixel depth noise std")
    outliers: float = Field(0.0, ge=0.0, le=0.5, description="fraction of pixels whose depth is off by x0.5-0.8 "
                            "or x1.25-2, with ordinary confidence")
    outlier_shape: Literal["blobs", "pixels"] = "blobs"
    pose_noise_deg: float = Field(0.0, ge=0.0, le=20.0, description="per-view rotation noise std (deg), views "
                                  "after the first; camera centre noise std this x pi/180 x median depth per axis")
    conf_informative: float = Field(1.0, ge=0.0, le=1.0, description="1: confidence falls with the (non-outlier) "
                                    "error; 0: a random smooth field unrelated to it")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = {"preset": v}
        if isinstance(v, dict) and v.get("preset") is not None:
            name = v["preset"]
            if name not in ORACLE_ERROR_PRESETS:
                raise ValueError(f"unknown preset {name!r}; one of {sorted(ORACLE_ERROR_PRESETS)}")
            v = {**ORACLE_ERROR_PRESETS[name], **v}
        return v

    @property
    def any(self) -> bool:
        return bool(self.depth_warp or self.pixel_noise or self.outliers or self.pose_noise_deg
                    or self.conf_informative < 1.0)


BUILTIN_BACKENDS = ("da3", "oracle")


class ModelConfig(_Strict):
    # "da3", "oracle", or a plug-in "package.module:factory": factory(**backend_args) returns an object with
    # forward_windows / info / health_check (docs/ARCHITECTURE.md, "Model backends").
    backend: str = "da3"
    backend_args: dict[str, Any] = Field(default_factory=dict)
    # hub repo id ("org/name[@rev]"), local dir in the hub layout, or "random:<model_name>"
    checkpoint: str = "depth-anything/DA3-BASE"
    model_name: str | None = None
    # Used only if `checkpoint` cannot be resolved (offline); must be stated in the config explicitly.
    fallback_checkpoint: str | None = None
    device: str | None = None
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    # torch.compile backend ("inductor" needs a C compiler on CPU; "aot_eager" compiles nothing natively).
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"
    # With `compile`, the replica runs these window shapes, (views, height, width) at the model's input size,
    # at every batch size it may see before it reports healthy: graphs are static, so a shape not warmed here
    # compiles on its first request. Default: 6 views of a 4:3 landscape frame at process_res 504.
    compile_warmup_shapes: list[tuple[int, int, int]] = Field(default_factory=lambda: [(6, 378, 504)])
    # Batch sizes to warm; null = 1..batching.max_batch_size (retuning it upwards warms the new sizes).
    compile_warmup_batch_sizes: list[int] | None = None
    # Also warm the variant with client pose priors (a different graph) when the network accepts them.
    compile_warmup_priors: bool = False
    ref_view_strategy: str = "saddle_balanced"
    # Oracle backend (tests/benchmarks): the synthetic scene to answer for, and its gauge noise.
    oracle_scene: dict[str, Any] | None = None
    oracle_scale_range: tuple[float, float] = (0.5, 2.0)
    oracle_depth_noise: float = 0.0  # legacy: = oracle_errors.pixel_noise (confidence knows the noise)
    oracle_pose_noise: float = 0.0  # legacy: = oracle_errors.pose_noise_deg
    oracle_seed: int = 0
    oracle_errors: OracleErrors | None = None

    @field_validator("backend")
    @classmethod
    def _backend_known_or_importable(cls, v: str) -> str:
        if v in BUILTIN_BACKENDS:
            return v
        from serve_app.model.backends import resolve_factory  # lazy: backends imports this module

        resolve_factory(v)  # ValueError with the reason
        return v

    @model_validator(mode="after")
    def _one_error_spelling(self) -> ModelConfig:
        if self.oracle_errors is not None and (self.oracle_depth_noise or self.oracle_pose_noise):
            raise ValueError("oracle_errors replaces oracle_depth_noise / oracle_pose_noise: give only one")
        return self

    def oracle_error_model(self) -> OracleErrors:
        """The oracle's errors: `oracle_errors`, or the legacy fields mapped onto it."""
        if self.oracle_errors is not None:
            return self.oracle_errors
        return OracleErrors(pixel_noise=self.oracle_depth_noise, pose_noise_deg=self.oracle_pose_noise)

    @field_validator("compile_warmup_shapes")
    @classmethod
    def _warmup_shapes_valid(cls, v: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        for n, h, w in v:
            if n < 1 or h < 14 or w < 14 or h % 14 or w % 14:
                raise ValueError(f"each shape is (views >= 1, height, width) with sides multiples of 14, got "
                                 f"{(n, h, w)}")
        return v

    @field_validator("compile_warmup_batch_sizes")
    @classmethod
    def _warmup_batches_valid(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(b < 1 or b > 256 for b in v):
            raise ValueError(f"batch sizes must be in 1..256, got {v}")
        return v


class BatchConfig(_Strict):
    max_batch_size: int = Field(8, ge=1, le=256)
    # Only an idle model waits this long for company: windows arriving during a forward are held by the model
    # server's batch gate and go together into the next batch whatever this is (bench/README.md: the same batch
    # sizes at 0, 2 and 10 ms under K=4 and K=16 load, and 2 ms less latency per window than 2 ms at low load).
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=5.0)


class LimitsConfig(_Strict):
    max_sessions: int = Field(64, ge=1)
    # None: max_sessions // 8 (at least 1), so a few keys cannot fill the server for everyone. Applies to keyed
    # sessions only: with auth `none` there are no keys and max_sessions is the limit.
    max_sessions_per_key: int | None = Field(None, ge=1, description="concurrent sessions per API key")
    sessions_per_minute: float = Field(60.0, gt=0, description="session creations per key per minute")
    frames_per_s: float = Field(120.0, gt=0, description="frames per second per session (burst 2x)")
    bytes_per_s: float = Field(64 * 1024 * 1024, gt=0, description="upload bytes per second per session (burst 2x)")
    max_in_flight: int = Field(32, ge=1, le=4096, description="accepted-but-unprocessed frames per session")
    max_windows_in_flight: int = Field(2, ge=1, le=16, description="model calls outstanding per session")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=15 * 1024 * 1024)  # proxy caps messages at 16 MiB
    max_image_pixels: int = Field(40_000_000, ge=1024)
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])
    max_text_message_bytes: int = Field(12 * 1024 * 1024, ge=1024, le=15 * 1024 * 1024)
    max_process_res: int = Field(1008, ge=140, le=2016)
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="one-shot route: whole request")
    max_upload_files: int = Field(1000, ge=1)
    max_upload_frames: int = Field(600, ge=1, description="one-shot route: frames taken from uploads")
    sweep_interval_s: float = Field(5.0, gt=0)
    expired_tombstone_s: float = Field(3600.0, ge=0, description="how long an expired id answers SESSION_EXPIRED")
    model_timeout_s: float = Field(120.0, gt=0)
    model_retries: int = Field(1, ge=0, le=5)
    stats_cache_s: float = Field(2.0, ge=0, le=300, description="/stats reuses Serve's controller status this "
                                 "long (the controller call runs off the event loop)")
    max_unacked_result_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="result bytes sent to a "
                                          "connection beyond its last `received`; the sender pauses there")
    slow_reader_timeout_s: float = Field(60.0, gt=0, description="a paused sender waits this long for a "
                                         "`received` before closing with SLOW_CONSUMER (4408)")
    drain_poll_s: float = Field(0.25, gt=0, le=10, description="how often an ingress replica checks whether "
                                "Serve is draining it")
    # --- media decoding (untrusted uploads): docs/SECURITY.md "Media and uploads" ---
    max_image_bit_depth: Literal[8, 16] = Field(16, description="bits per sample an image may declare (PNG)")
    max_image_decoded_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="bytes one image may decode to "
                                         "(checked from the header, then on the decoded result)")
    decode_cpu_s_per_s: float = Field(1.0, gt=0, description="image decode CPU seconds per second per session; "
                                      "over it a frame gets DECODE_BUDGET_EXCEEDED")
    decode_cpu_burst_s: float = Field(5.0, gt=0, description="decode CPU seconds a session may spend at once")
    max_decode_slots_per_session: int = Field(1, ge=1, le=64, description="image decodes one session may run "
                                              "at once in the replica's decode pool")
    max_video_decoded_frames: int = Field(3000, ge=1, description="one-shot route: frames decoded per video "
                                          "(skipped ones count); decoding stops there")
    max_video_decoded_bytes: int = Field(4 * 1024 ** 3, ge=1024, description="one-shot route: bytes of "
                                         "decoded pictures per video (VIDEO_TOO_LARGE beyond)")
    max_video_decode_s: float = Field(60.0, gt=0, description="one-shot route: seconds spent decoding one video "
                                      "(VIDEO_TOO_LARGE beyond)")
    video_decode_workers: int = Field(2, ge=1, le=64, description="threads of the replica's video decode pool")
    # --- sessions, protocol and state (docs/SECURITY.md) ---
    max_session_points: int = Field(5_000_000, ge=1000, le=50_000_000, description="cap on a session's "
                                    "max_points (clients may only lower it)")
    max_session_ttl_s: float = Field(86400.0, gt=0, le=30 * 86400, description="cap on a session's ttl_s")
    max_session_idle_ttl_s: float = Field(3600.0, gt=0, le=7 * 86400, description="cap on idle_ttl_s")
    max_protocol_errors: int = Field(50, ge=1, le=100_000, description="malformed messages one WebSocket may "
                                     "send before it is closed with TOO_MANY_ERRORS (4400)")
    ws_idle_timeout_s: float = Field(300.0, gt=0, le=7 * 86400, description="a WebSocket with no work in "
                                     "flight and no frame/flush/finalize for this long is closed (4420)")
    max_concurrent_exports: int = Field(4, ge=1, le=256, description="PLY/GLB exports running at once per "
                                        "ingress replica; more answer EXPORT_BUSY with Retry-After")

    @property
    def sessions_per_key(self) -> int:
        """The per-key session cap in effect."""
        if self.max_sessions_per_key is not None:
            return min(self.max_sessions_per_key, self.max_sessions)
        return max(1, self.max_sessions // 8)


class SessionActorConfig(_Strict):
    name: str = "da3_session_store"
    namespace: str = "da3-serve"
    max_restarts: int = -1
    # -1: a call in flight when the store's actor (or its node) dies is re-run on the restarted actor, however
    # long the GCS takes to notice the loss (a fixed count runs out first, and the stream then fails). Safe
    # because every hot-path call is idempotent on retry (accept_frame and commit_window find their own result
    # stored); `create` is never retried (a lost answer must not leave an unknown session counting).
    max_task_retries: int = Field(-1, ge=-1, description="Ray retries of a store call whose actor died "
                                  "(-1: until the actor is back; needs max_restarts != 0)")
    # Threads of each shard that encode and write its journal / Redis payloads off the actor's event loop;
    # a session's writes stay in order (one at a time per session), sessions write in parallel.
    io_threads: int = Field(4, ge=1, le=64, description="threads per store shard for persistence work")
    state_dir: str | None = None  # snapshot directory; None = in memory only
    # Session-store actors (`<name>`, `<name>-1`, ...): the shard is chosen at creation and carried in the
    # session id (serve_app/sessions/shards.py); global limits hold across shards. 1 = today's single actor.
    shards: int = Field(1, ge=1, le=256, description="session-store actors the sessions are spread over")
    # Keep the shards off the head node (it runs the GCS, the controller and the proxy); on a cluster with no
    # other node they fall back to the head, with a log line. False: Ray's SPREAD strategy over all nodes.
    avoid_head_node: bool = True
    # Accepted frames an ingress replica sends a shard in one call while its previous accept call to that
    # shard is still out (serve_app/sessions/accept_batch.py): a shard's cost is per call, not per frame.
    # 1: one call per frame.
    accept_batch: int = Field(32, ge=1, le=1024, description="most frames per accept call to a store shard")

    # Where sessions persist (serve_app/sessions/state_backends.py): memory (lost with the actor), journal (files in
    # state_dir, lost with the node), redis (survives the node). None: journal if state_dir is set, else memory.
    backend: Literal["memory", "journal", "redis"] | None = None
    redis_url: str | None = None  # redis://host:port/db (rediss:// for TLS); None: read from redis_url_env
    redis_url_env: str = "DA3_REDIS_URL"
    redis_prefix: str | None = None  # key prefix; None: "da3:<namespace>/<name>:" (apps may share one Redis)
    # Keys live this long past the session's own expiry (the actor's sweep deletes them first; a touch is not
    # written to Redis, so the grace covers an idle session that clients kept alive with touches only).
    redis_expiry_grace_s: float = Field(3600.0, ge=0)
    redis_timeout_s: float = Field(5.0, gt=0)  # per command; a Redis that does not answer fails the call

    @property
    def effective_backend(self) -> str:
        return self.backend or ("journal" if self.state_dir else "memory")

    @model_validator(mode="after")
    def _backend_needs(self) -> SessionActorConfig:
        if self.backend == "journal" and not self.state_dir:
            raise ValueError("session_actor.backend journal needs session_actor.state_dir")
        return self


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class AuthConfig(_Strict):
    mode: Literal["none", "api_key"] = "none"
    api_keys: list[str] = Field(default_factory=list)
    api_keys_env: str = "DA3_API_KEYS"  # comma-separated keys, merged with api_keys
    # Operator keys: /stats, the dashboard's data and /healthz's details (also valid user keys). None configured
    # with mode none: every client is an operator (loopback-only unless allow_remote).
    operator_keys: list[str] = Field(default_factory=list)
    operator_keys_env: str = "DA3_OPERATOR_KEYS"  # comma-separated, merged with operator_keys
    # Mode none: refuse clients whose address is not loopback unless this is true (a keyless server is local).
    allow_remote: bool = False
    # Host header names served (DNS rebinding); "*" any, "*.example.com" a domain. null: the loopback names
    # with mode none, any with api_key.
    allowed_hosts: list[str] | None = None

    def resolved_keys(self) -> list[str]:
        keys = list(self.api_keys)
        env = os.environ.get(self.api_keys_env, "")
        keys += [k.strip() for k in env.split(",") if k.strip()]
        return keys

    def resolved_operator_keys(self) -> list[str]:
        keys = list(self.operator_keys)
        keys += [k.strip() for k in os.environ.get(self.operator_keys_env, "").split(",") if k.strip()]
        return keys

    @model_validator(mode="after")
    def _keys_are_tokens(self) -> AuthConfig:
        # Browsers send the key as a WebSocket subprotocol, which must be an HTTP token.
        for key in self.resolved_keys() + self.resolved_operator_keys():
            if not key or any(c not in _TOKEN_CHARS for c in key):
                raise ValueError("API and operator keys may hold only letters, digits and !#$%&'*+-.^_`|~ "
                                 "(they travel as a WebSocket subprotocol token)")
        return self

    @model_validator(mode="after")
    def _keys_when_required(self) -> AuthConfig:
        if self.mode == "api_key" and not self.resolved_keys():
            raise ValueError(
                f"auth.mode is 'api_key' but no key is configured: set auth.api_keys or the "
                f"{self.api_keys_env} environment variable, or set auth.mode: none explicitly")
        return self


class AppArgs(_Strict):
    """Arguments of `serve_app.app:build_app` (the `args:` block of a Serve config)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    batching: BatchConfig = Field(default_factory=BatchConfig)
    session_defaults: SessionParams = Field(default_factory=SessionParams)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    session_actor: SessionActorConfig = Field(default_factory=SessionActorConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cors_origins: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> AppArgs:
        for field, cap in session_caps(self.limits).items():
            if getattr(self.session_defaults, field) > cap:
                raise ValueError(f"session_defaults.{field} ({getattr(self.session_defaults, field):g}) is above "
                                 f"the server's cap limits ({cap:g}); lower it or raise the cap")
        return self


def parse_args(args: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate builder args with an error that lists every bad field."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValueError("invalid da3-serve application args:\n" + "\n".join(lines)) from None
