"""The ingress's FastAPI app factory (no Ray cluster): each replica builds its own app from its args, with the
routes bound to its own methods."""

from fastapi.routing import APIRoute, APIWebSocketRoute

from serve_app.config import parse_args
from serve_app.deployments.ingress import IngressReplica
from serve_app.ingress.app import ROUTES, make_api
from serve_app.ingress.auth import AccessMiddleware


def _middleware(api) -> list[str]:
    return [m.cls.__name__ for m in api.user_middleware]


def test_every_route_of_the_table_is_bound_to_the_replica():
    replica = object.__new__(IngressReplica)  # the methods are all the routes need; no Ray here
    api = make_api(replica, parse_args({}))
    routes = {(tuple(sorted(r.methods)) if isinstance(r, APIRoute) else ("WS",), r.path): r
              for r in api.routes if isinstance(r, (APIRoute, APIWebSocketRoute))}
    assert len(routes) == len(ROUTES)
    for method, path, name, _ in ROUTES:
        route = routes[((method,), path)]
        assert route.endpoint.__self__ is replica and route.endpoint.__name__ == name
        # a bound method: FastAPI sees no `self` parameter to fill from the query string
        assert "self" not in {p.name for p in route.dependant.query_params}


def test_apps_are_built_per_replica_from_their_args():
    replica = object.__new__(IngressReplica)
    plain = make_api(replica, parse_args({}))
    with_cors = make_api(replica, parse_args({"cors_origins": ["https://app.example"]}))
    again = make_api(replica, parse_args({}))
    assert _middleware(plain) == ["AccessMiddleware"]
    assert _middleware(with_cors) == ["AccessMiddleware", "CORSMiddleware"]
    assert _middleware(again) == ["AccessMiddleware"]  # building another app changed nothing here
    policy = next(m for m in with_cors.user_middleware if m.cls is AccessMiddleware).kwargs["policy"]
    assert policy.cors_origins == ["https://app.example"]
