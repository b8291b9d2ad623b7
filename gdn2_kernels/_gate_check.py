"""The log-decay check without a host sync (``validate_values``).

A log-decay ``g`` must be finite and <= 0. Checking it on the host costs a pass over g and a
device sync per call, which serving stacks cannot pay (a synced call cannot be captured in a CUDA
graph). So the kernels that already read g (intra_fwd, recurrent_fwd) check it as they load it:

- a bad entry turns the log-decay of its chunk (chunk_gdn2) or token (fused_recurrent_gdn2) into
  NaN, so the outputs of that sequence and head are NaN from there to the end of the sequence,
  and so is its final state: never finite garbage;
- and the kernel raises a per-device error flag (an int32 on the device).

The host reads the flag without waiting for the GPU:

- ``validate_values=True`` (the default): each call starts a non-blocking copy of the flag to
  pinned memory and records an event; a later call whose earlier copy has completed (the event
  query does not block) raises ``ValueError``. So a bad g raises at one of the next calls, as a
  CUDA error would, while its outputs are already NaN. :func:`check` raises at once (it syncs).
  While a CUDA graph is being captured nothing is copied: the kernel still poisons the outputs and
  sets the flag, which the next :func:`check` or uncaptured call reports.
- ``validate_values="sync"``: the call reads the flag before returning (one device sync) and raises
  there.
- On the CPU (Triton's interpreter) the kernel has finished when the launch returns, so the flag
  is read at once in either mode: the call itself raises.

Cost on the GPU, with ``validate_values=True``: a compare per g element inside a kernel that loads
it anyway, and per call a 4-byte device-to-host copy and an event record (host time only).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

MESSAGE = ("g (log-decay) has NaN, Inf or positive entries; it must be finite and <= 0 (decay "
           "exp(g) in (0, 1]). Check the gate computation.")
_POISONED = (" The outputs of the affected sequences and heads are NaN from the {unit} holding the "
             "bad entry on.")


class InvalidGateError(ValueError):
    """A call's log-decay g had NaN, Inf or positive entries (found by the kernel)."""


@dataclass
class _Pending:
    event: torch.cuda.Event
    host: torch.Tensor  # pinned int32[1]
    op: str


_lock = threading.Lock()
_flags: dict[torch.device, torch.Tensor] = {}
_pending: dict[torch.device, _Pending] = {}
_host_buffers: dict[torch.device, torch.Tensor] = {}


def mode(validate_values) -> bool | str:
    """``validate_values`` checked: True, False or "sync"."""
    if validate_values is True or validate_values is False or validate_values == "sync":
        return validate_values
    raise ValueError(f"validate_values must be True, False or 'sync', got {validate_values!r}")


def flag(device: torch.device) -> torch.Tensor:
    """The device's error flag (int32[1]) that kernels set on a bad g; a meta stand-in on meta."""
    if device.type == "meta":
        return torch.empty(1, dtype=torch.int32, device=device)
    with _lock:
        f = _flags.get(device)
        if f is None:
            f = _flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return f


def _raise(op: str) -> None:
    unit = "token" if "recurrent" in op else "chunk"
    raise InvalidGateError(f"{op}: {MESSAGE}{_POISONED.format(unit=unit)}")


def _read_and_clear(device: torch.device) -> bool:
    f = _flags.get(device)
    if f is None:
        return False
    bad = bool(f.item())
    if bad:
        f.zero_()
    return bad


def before_call(device: torch.device) -> None:
    """Raise for an earlier call on ``device`` whose flag copy has completed (never waits)."""
    p = _pending.get(device)
    if p is None or _capturing(device) or not p.event.query():
        return
    del _pending[device]
    if int(p.host[0]) != 0:
        _flags[device].zero_()
        _raise(f"an earlier {p.op} call")


def after_call(device: torch.device, validate, op: str) -> None:
    """After the kernels of a checked call: read the flag now (CPU, "sync") or start its copy."""
    if validate is False or device.type == "meta":
        return
    if device.type != "cuda" or validate == "sync":
        if _read_and_clear(device):
            _raise(op)
        return
    if _capturing(device) or device in _pending:
        return
    host = _host_buffers.get(device)
    if host is None:
        host = _host_buffers[device] = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    host.copy_(_flags[device], non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending[device] = _Pending(event, host, op)


@contextlib.contextmanager
def checked(device: torch.device, validate_values, op: str):
    """Around one call's launches: report an earlier call's bad g before (never waiting), and
    read or start reading this call's error flag after."""
    if validate_values is not False:
        before_call(device)
    yield
    after_call(device, validate_values, op)


def error_flag(device: torch.device, validate_values) -> torch.Tensor | None:
    """The error flag the forward kernels set on a bad g, or None without the check."""
    return flag(device) if validate_values is not False else None


def check(device: torch.device | str | None = None) -> None:
    """Wait for the GPU and raise :class:`InvalidGateError` if a checked call since the last
    check had a bad g. ``device``: one device, or every device that ran a checked call."""
    devices = [_indexed(torch.device(device))] if device is not None else list(_flags)
    for dev in devices:
        _pending.pop(dev, None)
        if _read_and_clear(dev):
            _raise("a chunk_gdn2 / fused_recurrent_gdn2 call")


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: flags are keyed by tensors' devices, which carry an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
