"""Backends served through the `model.backend: "package.module:factory"` seam (tests/model/test_backends.py).

`make_backend` is what a user would write to serve an evaluation model of their own without editing serve_app:
here the synthetic-scene oracle under another name, counting its windows.
"""

from __future__ import annotations

from serve_app.model.oracle import OracleModel


class NamedOracle:
    any_view = True

    def __init__(self, scene: dict, label: str, errors: str | dict | None = None):
        self.inner = OracleModel(scene, errors=errors)
        self.label = label
        self.calls = 0

    def forward_windows(self, requests):
        self.calls += 1
        return self.inner.forward_windows(requests)

    def info(self) -> dict:
        return {**self.inner.info(), "model_name": self.label, "backend": "plugin", "calls": self.calls}

    def health_check(self) -> None:
        self.inner.health_check()


def make_backend(scene: dict, label: str = "my-model", errors: str | dict | None = None) -> NamedOracle:
    return NamedOracle(scene, label, errors)


class NoForward:  # lacks forward_windows
    def info(self) -> dict:
        return {}

    def health_check(self) -> None:
        pass


def make_incomplete() -> object:
    return NoForward()


NOT_CALLABLE = 42
