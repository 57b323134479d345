import pytest

from serve_app.config import AppArgs, AuthConfig, SessionParams, merge_session_params, parse_args
from serve_app.errors import ErrorCode, ServiceError


def test_defaults_are_valid_and_overrides_merge():
    d = SessionParams()
    p = merge_session_params(d, {"window_size": 8, "overlap": 3, "point_encoding": "float32"})
    assert (p.window_size, p.overlap, p.new_per_window, p.point_encoding) == (8, 3, 5, "float32")
    assert p.process_res == d.process_res


@pytest.mark.parametrize("body,field", [
    ({"overlap": 6}, "overlap"),
    ({"window_size": 1}, "window_size"),
    ({"process_res": 5000}, "process_res"),
    ({"point_encoding": "int8"}, "point_encoding"),
    ({"nonsense": 1}, "nonsense"),
    ({"conf_percentile": "high"}, "conf_percentile"),
])
def test_invalid_params_name_the_field(body, field):
    with pytest.raises(ServiceError) as ei:
        merge_session_params(SessionParams(), body)
    assert ei.value.code is ErrorCode.INVALID_PARAMS
    assert ei.value.details["field"] == field
    assert ei.value.http_status == 422


def test_server_cap_on_process_res():
    with pytest.raises(ServiceError) as ei:
        merge_session_params(SessionParams(), {"process_res": 1000}, max_process_res=504)
    assert ei.value.details["field"] == "process_res"


def test_non_object_body_rejected():
    with pytest.raises(ServiceError):
        merge_session_params(SessionParams(), [1, 2])  # type: ignore[arg-type]


def test_builder_args_validation_is_readable():
    with pytest.raises(ValueError, match=r"batching.max_batch_size"):
        parse_args({"batching": {"max_batch_size": 0}})
    with pytest.raises(ValueError, match=r"model.bogus"):
        parse_args({"model": {"bogus": 1}})
    assert parse_args({"model": {"checkpoint": "random:da3-small"}}).model.checkpoint == "random:da3-small"


def test_api_key_mode_needs_a_key(monkeypatch):
    monkeypatch.delenv("DA3_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no key is configured"):
        AuthConfig(mode="api_key")
    monkeypatch.setenv("DA3_API_KEYS", "k1, k2")
    assert AuthConfig(mode="api_key").resolved_keys() == ["k1", "k2"]
    assert AppArgs().auth.mode == "none"


def test_global_consistency_is_an_opt_in_session_param():
    assert SessionParams().global_consistency is False
    p = merge_session_params(SessionParams(), {"global_consistency": True})
    assert p.global_consistency is True
    with pytest.raises(ServiceError) as ei:
        merge_session_params(SessionParams(), {"global_consistency": "sometimes"})
    assert ei.value.details["field"] == "global_consistency"
