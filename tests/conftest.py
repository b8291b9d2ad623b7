"""Shared test set-up: NaN-poisoned allocations, the gpu marker, readable ids.

The default run (``pytest -q -m "not gpu"``) executes the real Triton kernels through Triton's
interpreter on the CPU: without a CUDA device each launch on CPU tensors is interpreted
(``gdn2_kernels._interpreter``), exactly as a user's call is; nothing is set here.
"""
from __future__ import annotations

import os

import pytest
import torch


def _on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the marker exists when run from elsewhere.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped on CPU")
    config.addinivalue_line("markers", "slow: longer interpreter runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device with -m gpu)")
    for item in items:
        if "gpu" in item.keywords and not _on_gpu():
            item.add_marker(skip)


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """Ids like ``B2-T100-H2-K32-V48-fp32``: dtypes shortened, cases by their ``label()``."""
    if isinstance(val, torch.dtype):
        from gdn2_kernels.configs import short_dtype_name

        return short_dtype_name(val)
    label = getattr(val, "label", None)
    if callable(label):
        return label()
    return None


def _poisoned(factory):
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            with torch.no_grad():
                out.fill_(float("nan"))
        return out

    return make


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every floating tensor from torch.empty / empty_like / empty_strided starts as NaN.

    Launchers allocate their outputs with these, so an element a kernel forgets to write shows up
    as NaN, which every comparison in the suite treats as a failure.
    """
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))


@pytest.fixture
def force_segments(monkeypatch: pytest.MonkeyPatch):
    """``force_segments(L)`` makes the state launchers take the two-level scan with L chunks per
    segment (on CPU there is no SM count, so the rule never asks for it) and returns the list of
    chunk counts the rule was asked about (non-empty once a segmented launcher ran)."""
    from gdn2_kernels import _parallel

    def force(L: int) -> list[int]:
        asked: list[int] = []

        def rule(programs: int, num_chunks: int, device) -> int:
            asked.append(num_chunks)
            return L

        monkeypatch.setattr(_parallel, "segment_chunks", rule)
        return asked

    return force
