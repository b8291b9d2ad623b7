"""Fixtures for tests/bench: fake providers and measurer, timings injected through the API."""
from __future__ import annotations

import pytest

from gdn2_kernels.bench.model import Ceilings
from gdn2_kernels.bench.providers import Provider, Registry, Unavailable

# ms per (provider, mode) at the smallest shape; larger shapes scale with T for attention.
FAKE_MS = {
    ("ours", "fwd"): 0.5, ("ours", "fwdbwd"): 2.0,
    ("flaish", "fwd"): 1.0, ("flaish", "fwdbwd"): 5.0,
    ("attn", "fwd"): 0.4, ("attn", "fwdbwd"): 1.5,
}


class FakeMeasurer:
    """Reads the fake latency the step returns instead of timing it."""

    def time_ms(self, fn):
        return fn(), 0.01

    def peak_bytes(self, fn):
        fn()
        return 64 * 2 ** 20

    def ceilings(self):
        return Ceilings(matmul_tflops=700.0, copy_gbps=3000.0)

    def sync(self):
        pass


def _step(name):
    def make(op, inputs, mode):
        if name == "ours" and mode == "fwdbwd" and inputs.shape.T > 4096:
            def fails():
                raise NotImplementedError("backward not written yet")
            return fails
        scale = inputs.shape.T / 1024 if name == "attn" else 1.0
        ms = FAKE_MS[(name, mode)] * scale
        return lambda: ms
    return make


def _missing():
    raise Unavailable("fakepkg not importable (ModuleNotFoundError: No module named 'fakepkg')")


def fake_registry() -> Registry:
    r = Registry()
    r.register(Provider("ours", "ours", "gdn2", False, False, ("fwd", "fwdbwd"),
                        lambda: object(), _step("ours")))
    r.register(Provider("flaish", "FLA-like", "gdn2", True, False, ("fwd", "fwdbwd"),
                        lambda: object(), _step("flaish")))
    r.register(Provider("attn", "attention", "attention", True, False, ("fwd", "fwdbwd"),
                        lambda: object(), _step("attn")))
    r.register(Provider("missing", "a missing baseline", "mamba2", True, False,
                        ("fwd", "fwdbwd", "decode"), _missing, _step("attn")))
    return r


FAKE_PROVENANCE = {"date": "2026-01-01T00:00:00+00:00", "gpu": {"name": "Fake GPU 80GB"},
                   "software": {"torch": "0", "triton": "0"}, "git_commit": None}


@pytest.fixture
def fake_measurer():
    return FakeMeasurer()


@pytest.fixture(name="fake_registry")
def _fake_registry_fixture():
    return fake_registry()


@pytest.fixture
def fake_provenance():
    return dict(FAKE_PROVENANCE)
