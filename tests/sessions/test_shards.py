"""Session-store shards: id <-> shard routing, placement, cluster-wide limits (plain), and a real 2-shard app."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import SCENE, app_args, deployed

from serve_app.config import LimitsConfig, SessionActorConfig, SessionParams
from serve_app.errors import ErrorCode, ServiceError
from serve_app.sessions.session_store import SessionStore, new_session_id
from serve_app.sessions.shards import (
    Admission,
    actor_name,
    merge_lists,
    pick_shard,
    place_shards,
    shard_of,
    shard_prefix,
)


# --- routing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 2, 3, 16, 256])
def test_every_shard_round_trips_through_its_ids(shards):
    for k in range(shards):
        store = SessionStore(LimitsConfig())
        store.id_prefix = shard_prefix(k, shards)
        sid = store.create(SessionParams(), None, 0.0).session_id
        assert shard_of(sid, shards) == k
        assert store.get(sid) is store.sessions[sid]


def test_one_shard_ids_are_unchanged_and_belong_to_shard_zero():
    assert shard_prefix(0, 1) == ""
    for _ in range(200):
        sid = new_session_id()
        assert "." not in sid  # the token alphabet never holds the separator
        assert shard_of(sid, 1) == 0 and shard_of(sid, 4) == 0  # sharding turned on later: still reachable


@pytest.mark.parametrize("sid", ["s2.abc", "s9.abc", "x1.abc", "s.abc", "1.abc", "s-1.abc", "s12345.abc",
                                 "s1a.abc", ".abc", "sx.abc"])
def test_an_id_naming_no_shard_of_this_server_is_not_found(sid):
    with pytest.raises(ServiceError) as exc:
        shard_of(sid, 2)
    assert exc.value.code is ErrorCode.SESSION_NOT_FOUND and exc.value.fatal


def test_prefix_out_of_range_is_a_bug():
    with pytest.raises(ValueError):
        shard_prefix(2, 2)


def test_actor_names_keep_the_one_shard_name_for_shard_zero():
    assert [actor_name("store", k) for k in range(3)] == ["store", "store-1", "store-2"]


def test_shard_state_dirs_are_apart():
    from serve_app.deployments.session_actor import shard_state_dir

    assert shard_state_dir(None, 3) is None
    assert shard_state_dir("/var/da3", 0) == "/var/da3"
    assert shard_state_dir("/var/da3/", 2) == "/var/da3-shard2"  # a sibling: never inside shard 0's journal


def test_config_shards_default_and_bounds():
    assert SessionActorConfig().shards == 1 and SessionActorConfig().avoid_head_node is True
    with pytest.raises(ValueError):
        SessionActorConfig(shards=0)
    with pytest.raises(ValueError):
        SessionActorConfig(shards=257)


# --- placement ----------------------------------------------------------------------------------------------
def test_least_loaded_shard_that_answered():
    assert pick_shard([0, 0]) == 0
    assert pick_shard([1, 0]) == 1
    assert pick_shard([3, None, 2]) == 2
    assert pick_shard([None, 5]) == 1
    with pytest.raises(ServiceError):
        pick_shard([None, None])


def _nodes(*spec):
    return [{"node_id": nid, "alive": alive, "head": head} for nid, alive, head in spec]


def test_shards_go_round_robin_over_worker_nodes_never_the_head():
    nodes = _nodes(("c", True, False), ("h", True, True), ("a", True, False), ("b", False, False))
    placement, fell_back = place_shards(nodes, 4, avoid_head=True)
    assert placement == ["a", "c", "a", "c"] and not fell_back  # dead b and head h left out


def test_head_only_cluster_falls_back_to_the_head():
    placement, fell_back = place_shards(_nodes(("h", True, True)), 2, avoid_head=True)
    assert placement == [None, None] and fell_back


def test_without_avoid_head_ray_spreads():
    placement, fell_back = place_shards(_nodes(("h", True, True), ("a", True, False)), 3, avoid_head=False)
    assert placement == [None] * 3 and not fell_back


# --- global limits ------------------------------------------------------------------------------------------
def _create_on_shards(stores, adm, owner, now):
    """What the admission actor does: census of every shard, the global check, the least loaded shard."""
    total = sum(len(s.sessions) for s in stores)
    mine = sum(1 for s in stores for x in s.sessions.values() if x.owner == owner) if owner else 0
    adm.check(total, mine, owner, now)
    k = pick_shard([len(s.sessions) for s in stores])
    return stores[k].create(SessionParams(), owner, now)


def test_max_sessions_holds_across_shards_with_the_one_shard_code():
    lim = LimitsConfig(max_sessions=5, sessions_per_minute=1e6)
    stores = []
    for k in range(3):
        stores.append(SessionStore(lim))
        stores[-1].id_prefix = shard_prefix(k, 3)
    adm = Admission(lim)
    made = [_create_on_shards(stores, adm, None, 0.0) for _ in range(5)]
    assert sorted(shard_of(s.session_id, 3) for s in made) == [0, 0, 1, 1, 2]  # balanced
    with pytest.raises(ServiceError) as sharded:
        _create_on_shards(stores, adm, None, 0.0)
    one = SessionStore(lim)
    for _ in range(5):
        one.create(SessionParams(), None, 0.0)
    with pytest.raises(ServiceError) as single:
        one.create(SessionParams(), None, 0.0)
    assert (sharded.value.code, sharded.value.message) == (single.value.code, single.value.message)
    assert sharded.value.code is ErrorCode.SESSION_LIMIT
    # a deletion on any shard frees a place: counts come from the shards, nothing to release
    stores[2].delete(next(s.session_id for s in made if shard_of(s.session_id, 3) == 2), None)
    assert shard_of(_create_on_shards(stores, adm, None, 0.0).session_id, 3) == 2


def test_per_key_cap_and_creation_rate_hold_across_shards():
    lim = LimitsConfig(max_sessions=100, max_sessions_per_key=3, sessions_per_minute=4)
    stores = [SessionStore(lim), SessionStore(lim)]
    adm = Admission(lim)
    for _ in range(3):
        _create_on_shards(stores, adm, "alice", 0.0)
    assert [len(s.sessions) for s in stores] == [2, 1]  # alice's 3 on both shards
    with pytest.raises(ServiceError) as exc:
        _create_on_shards(stores, adm, "alice", 0.0)
    assert exc.value.code is ErrorCode.KEY_SESSION_LIMIT
    _create_on_shards(stores, adm, "bob", 0.0)  # another key is not affected
    # rate: 4 per minute per key in all, wherever the sessions went (alice used 3 + a refused one took none)
    for s in stores:
        for sid in [x.session_id for x in s.sessions.values() if x.owner == "alice"]:
            s.delete(sid, "alice")
    _create_on_shards(stores, adm, "alice", 0.0)
    with pytest.raises(ServiceError) as exc:
        _create_on_shards(stores, adm, "alice", 0.0)
    assert exc.value.code is ErrorCode.RATE_LIMITED and exc.value.details["retry_after_s"] > 0


def test_lists_merge_oldest_first_with_counts_summed():
    a = {"sessions": [{"session_id": "s0.x", "created_at": 2.0}], "counts": {"total": 1, "streaming": 1},
         "limits": {"max_sessions": 4}, "ray_env": {}}
    b = {"sessions": [{"session_id": "s1.y", "created_at": 1.0}], "counts": {"total": 1, "complete": 1},
         "limits": {"max_sessions": 4}, "ray_env": {}}
    m = merge_lists([a, b])
    assert [s["session_id"] for s in m["sessions"]] == ["s1.y", "s0.x"]
    assert m["counts"] == {"total": 2, "streaming": 1, "complete": 1} and m["shards"] == [1, 1]
    assert m["limits"] == {"max_sessions": 4}
    assert "shards" not in merge_lists([a])


# --- a real app with two shards ---------------------------------------------------------------------------
KEYS = {"alice": {"Authorization": "Bearer key-alice"}, "bob": {"Authorization": "Bearer key-bob"},
        "op": {"Authorization": "Bearer key-op"}}


@pytest.fixture(scope="module")
def sharded_app(serve_url):
    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE},
                    auth={"mode": "api_key", "api_keys": ["key-alice", "key-bob"], "operator_keys": ["key-op"]},
                    limits={"max_sessions": 4, "max_sessions_per_key": 3, "sessions_per_minute": 600},
                    session_actor={"shards": 2})
    with deployed(serve_url, "sharded", args) as url:
        yield url, args


async def _stream(url: str, sid: str, headers: dict, seq, n: int) -> dict:
    import websockets

    from serve_app.media.imaging import encode_image
    from serve_app.protocol import encode_frame_message

    ws_url = url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}"
    results, final = {}, None
    async with websockets.connect(ws_url, additional_headers=headers, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for i in range(n):
            await ws.send(encode_frame_message(encode_image(seq.images[i], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "finalize"}))
        while final is None:
            m = await asyncio.wait_for(ws.recv(), 120)
            if isinstance(m, str):
                m = json.loads(m)
                if m["type"] == "frame_result":
                    results[m["frame_id"]] = m
                elif m["type"] in ("summary", "error"):
                    final = m
    return {"results": results, "final": final}


@pytest.mark.ray
async def test_two_shards_serve_list_limit_delete_and_expire(sharded_app, synthetic_seq):
    import ray

    url, args = sharded_app
    name, ns = args["session_actor"]["name"], args["session_actor"]["namespace"]
    assert ray.get_actor(name, namespace=ns) and ray.get_actor(f"{name}-1", namespace=ns)
    post = lambda who, body=None: httpx.post(f"{url}/ws/session/create", json=body or {},
                                             headers=KEYS[who], timeout=30)

    alice = [post("alice").json()["session_id"] for _ in range(3)]
    assert sorted(shard_of(s, 2) for s in alice) == [0, 0, 1]  # least loaded first: both shards used
    r = post("alice")
    assert r.status_code == 429 and r.json()["error"]["code"] == "KEY_SESSION_LIMIT"  # 2 + 1 across shards
    bob = post("bob").json()["session_id"]
    r = post("bob")
    assert r.status_code == 429 and r.json()["error"]["code"] == "SESSION_LIMIT"  # 4 in all, 2 per shard

    # streams on both shards complete, every frame processed
    on = {shard_of(s, 2): s for s in alice}
    outs = await asyncio.gather(*[_stream(url, on[k], KEYS["alice"], synthetic_seq, 6) for k in (0, 1)])
    for out in outs:
        assert out["final"]["type"] == "summary" and out["final"]["frames_processed"] == 6, out["final"]
        assert sorted(out["results"]) == list(range(6))
    for k in (0, 1):
        info = httpx.get(f"{url}/ws/session/{on[k]}", headers=KEYS["alice"]).json()
        assert info["state"] == "complete" and info["frames_processed"] == 6 and info["windows"] >= 2
        ply = httpx.get(f"{url}/ws/session/{on[k]}/reconstruction.ply", headers=KEYS["alice"], timeout=60)
        assert ply.status_code == 200 and len(ply.content) > 1000
    # a session id naming the other shard's actor is not found there (no existence oracle either)
    forged = "s1." + on[0].split(".", 1)[1]
    assert httpx.get(f"{url}/ws/session/{forged}", headers=KEYS["alice"]).status_code == 404
    assert httpx.get(f"{url}/ws/session/s7.{on[0][3:]}", headers=KEYS["alice"]).status_code == 404

    # the list covers both shards (a user sees their own), /stats all of them
    mine = httpx.get(f"{url}/ws/sessions", headers=KEYS["alice"]).json()
    assert sorted(s["session_id"] for s in mine["sessions"]) == sorted(alice)
    stats = httpx.get(f"{url}/stats", headers=KEYS["op"], timeout=30).json()
    assert sorted(s["session_id"] for s in stats["sessions"]) == sorted(alice + [bob])
    assert stats["counts"]["total"] == 4 and stats["counts"]["complete"] == 2 and stats["shards"] == [2, 2]

    # deleting on shard 1 frees a place, and the next session goes there
    victim = next(s for s in alice if shard_of(s, 2) == 1)
    assert httpx.delete(f"{url}/ws/session/{victim}", headers=KEYS["alice"]).status_code == 204
    assert httpx.get(f"{url}/ws/session/{victim}", headers=KEYS["alice"]).status_code == 404
    again = post("bob").json()["session_id"]
    assert shard_of(again, 2) == 1

    # expiry: each shard's sweep removes its own sessions
    for sid in [s for s in alice if s != victim] + [bob]:
        assert httpx.delete(f"{url}/ws/session/{sid}", headers=KEYS["alice" if sid in alice else "bob"]
                            ).status_code == 204
    assert httpx.delete(f"{url}/ws/session/{again}", headers=KEYS["bob"]).status_code == 204
    short = [post("alice", {"idle_ttl_s": 1.0}).json()["session_id"] for _ in range(2)]
    assert sorted(shard_of(s, 2) for s in short) == [0, 1]
    deadline = time.time() + 30
    codes = []
    while time.time() < deadline:
        codes = [httpx.get(f"{url}/ws/session/{s}", headers=KEYS["alice"]).status_code for s in short]
        if codes == [410, 410]:
            break
        await asyncio.sleep(0.5)
    assert codes == [410, 410]  # SESSION_EXPIRED, from each shard's own tombstone
    assert httpx.get(f"{url}/ws/sessions", headers=KEYS["op"]).json()["counts"]["total"] == 0


def test_each_shard_persists_under_its_own_name_and_prefix():
    """A restarted shard reloads only its own sessions: its Redis prefix (default: from its name) and journal
    directory are its own; shard 0 keeps today's, so growing from one shard keeps every stored session."""
    from serve_app.config import SessionActorConfig
    from serve_app.deployments.session_actor import shard_backend
    from serve_app.sessions.state_backends import make_backend

    cfg = SessionActorConfig(name="sessions", namespace="ns", backend="redis", redis_url="redis://127.0.0.1:1/0")
    prefixes = [make_backend(shard_backend(cfg, k)).prefix for k in range(3)]
    assert prefixes[0] == "da3:ns/sessions:" and len(set(prefixes)) == 3
    explicit = cfg.model_copy(update={"redis_prefix": "p:"})
    assert [shard_backend(explicit, k)["redis_prefix"] for k in range(2)] == ["p:", "p:shard1:"]
