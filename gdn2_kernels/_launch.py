"""Kernel launches, and compiling a whole pipeline ahead in parallel (the first call's cold start).

Every launcher starts its kernel through :func:`launch`, which is ``kernel[grid](**kwargs)``.

A fresh process compiles each kernel on its first launch, one after another: the first
``chunk_gdn2`` forward + backward compiles about seven kernels in a row (15.4 s on an H100 with
the shipped profile; 10.7 s compiled ahead: `profiles/logs/2026-11-27_*_cold_start*.json`).
:func:`compile_ahead` removes that chain:
it walks the forward and backward orchestration on ``meta`` tensors with the real shapes, and in
that walk :func:`launch` only *warms* each kernel (``JITFunction.warmup`` with the tensors replaced by
their dtypes: same specialisation, nothing runs). Triton's ``AsyncCompileMode`` turns every warm-up
into a job of a thread pool. The real launches that follow inside the same block find their
kernel compiled or being compiled and wait for it, and leaving the block waits for the rest (the
backward's kernels), so the first call costs about the slowest compile instead of the sum.
Results are unchanged: the same kernels with the same configs run; only when they compile moves.

Without ``AsyncCompileMode`` (Triton < 3.4), or for inputs the walk cannot describe on ``meta``
tensors (varlen: the chunk indices depend on ``cu_seqlens``' values), the op compiles lazily as
before.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

# The device the meta-tensor walk stands for (``None`` outside a walk).
_walk_device: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar(
    "gdn2_compile_walk_device", default=None)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


_host: list[bool] = []  # [whether launches run through the interpreter], decided at the first
_observers: list[Any] = []


def launch(kernel: Any, grid: tuple[int, ...], **kwargs: Any) -> None:
    """``kernel[grid](**kwargs)``; without a CUDA device (or with ``TRITON_INTERPRET=1``) through
    Triton's interpreter (``_interpreter.launch``); inside a compile-ahead walk, only compile it
    (see module doc). Observers (:func:`observed`) see every launch."""
    if _walk_device.get() is not None:
        from triton.runtime.jit import MockTensor

        mocked = {name: MockTensor(value.dtype) if isinstance(value, torch.Tensor) else value
                  for name, value in kwargs.items()}
        kernel.warmup(grid=grid, **mocked)
        return
    if _observers:
        for o in _observers:
            o.before(kernel, grid, kwargs)
        _run(kernel, grid, kwargs)
        for o in reversed(_observers):
            o.after(kernel, grid, kwargs)
        return
    _run(kernel, grid, kwargs)


def _run(kernel: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    if not _host:
        from gdn2_kernels import _env

        choice = _env.interpreter_choice()
        _host.append(choice if choice is not None else not torch.cuda.is_available())
    if _host[0]:
        from gdn2_kernels import _interpreter

        _interpreter.launch(kernel, grid, kwargs)
    else:
        kernel[grid](**kwargs)


def kernel_name(kernel: Any) -> str:
    """The Python name of a ``@triton.jit`` kernel (``_state_fwd_kernel``)."""
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


@contextlib.contextmanager
def observed(observer: Any) -> Iterator[Any]:
    """Inside the block, every launch of this process calls ``observer.before(kernel, grid,
    kwargs)`` before it and ``observer.after(...)`` after it (the per-stage breakdown of
    ``gdn2 stages`` times launches so; tests read the launched configs). Compile-ahead warm-ups
    are not launches."""
    _observers.append(observer)
    try:
        yield observer
    finally:
        _observers.remove(observer)


def walk_device(device: torch.device) -> torch.device:
    """The device a launcher plans for: the walked GPU for ``meta`` tensors, else ``device``."""
    if device.type == "meta":
        return _walk_device.get() or device
    return device


def async_compile_mode() -> type | None:
    """Triton's ``AsyncCompileMode`` (Triton >= 3.4) when none is active already, else None."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return None
    if active_mode.get() is not None:  # the caller compiles asynchronously already
        return None
    return AsyncCompileMode


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                       thread_name_prefix="gdn2-compile")
        return _pool


def empty_as(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty`` with ``x``'s shape, dtype and device: the launchers' ``empty_like`` for
    contiguous tensors. ``torch.empty_like`` of a meta tensor goes through
    torch's reference implementations, whose first use imports sympy (0.4 s of a cold start)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def meta_like(x: torch.Tensor | None) -> torch.Tensor | None:
    """A ``meta`` tensor with ``x``'s shape, strides and dtype (None stays None)."""
    if x is None:
        return None
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


@contextlib.contextmanager
def compile_ahead(device: torch.device, walk: Callable[[], None]) -> Iterator[bool]:
    """Compile every kernel ``walk`` launches in a thread pool; yields whether it did.

    ``walk`` calls launchers on meta tensors standing for tensors on ``device``. The block's real
    launches wait for their kernels; leaving the block waits for all of them.
    """
    mode_cls = async_compile_mode()
    if mode_cls is None:
        yield False
        return
    try:
        mode = mode_cls(_executor(), ignore_errors=True)
    except TypeError:  # Triton 3.4 - 3.6: no ignore_errors; a failed compile raises on exit
        mode = mode_cls(_executor())
    with mode:
        try:
            with walking(device):
                walk()
        except Exception as exc:  # noqa: BLE001 - the real launches compile lazily instead
            _warn_once(f"gdn2_kernels: compiling ahead failed ({type(exc).__name__}: {exc}); "
                       "kernels compile on first launch instead")
        yield True


@contextlib.contextmanager
def walking(device: torch.device) -> Iterator[None]:
    """Launches in this block only compile, and meta tensors stand for tensors on ``device``."""
    token = _walk_device.set(device)
    try:
        yield
    finally:
        _walk_device.reset(token)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
