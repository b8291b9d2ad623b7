"""GPU identity and health through NVML (``nvidia-ml-py``), and the plain "no GPU / no NVML" case.

:func:`identify` describes each visible device once (name, UUID, compute capability, memory,
driver); :func:`sample` reads what changes (SM/memory clocks, temperature, power, throttle
reasons) and is taken around every timing, so samples taken while the GPU throttled are flagged.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch

# Throttle reasons that slow a measurement down. Idle and "applications clocks setting" are not
# throttling; the SW power cap, HW slowdown and thermal reasons are.
_THROTTLE_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
_SLOWING = ("sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
            "hw_power_brake_slowdown")


@dataclass(frozen=True)
class GpuIdentity:
    """What a GPU is. Fields NVML cannot give are None."""

    index: int
    name: str
    uuid: str | None
    compute_capability: str | None
    memory_total_mb: int | None
    driver: str | None
    max_sm_clock_mhz: int | None = None
    max_mem_clock_mhz: int | None = None
    power_limit_w: float | None = None


@dataclass(frozen=True)
class GpuSample:
    """GPU state at one instant."""

    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    throttle_reasons: tuple[str, ...] = ()

    @property
    def throttled(self) -> bool:
        return any(r in _SLOWING for r in self.throttle_reasons)


@dataclass
class GpuReport:
    """Everything ``gdn2 info`` shows about GPUs, with the reason when there are none."""

    cuda_available: bool
    nvml: bool
    note: str
    devices: list[GpuIdentity] = field(default_factory=list)
    samples: list[GpuSample] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def _nvml():
    """The initialised ``pynvml`` module, or the reason it is unavailable (a str)."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return f"NVML unavailable ({type(exc).__name__}: {exc})"
    return pynvml


def nvml_status() -> str | None:
    """None when NVML works, else why not."""
    n = _nvml()
    return n if isinstance(n, str) else None


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


def _nvml_handle(index: int):
    """The NVML handle of torch's device ``index`` (NVML numbers all GPUs, torch the visible)."""
    n = _nvml()
    if isinstance(n, str):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [s.strip() for s in visible.split(",") if s.strip()]
        if index < len(ids):
            ident = ids[index]
            if ident.isdigit():
                return _try(n.nvmlDeviceGetHandleByIndex, int(ident))
            return _try(n.nvmlDeviceGetHandleByUUID, ident)
    return _try(n.nvmlDeviceGetHandleByIndex, index)


def identify(index: int) -> GpuIdentity:
    """Identity of CUDA device ``index`` from torch, completed by NVML where available."""
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    mem = torch.cuda.get_device_properties(index).total_memory // (1 << 20)
    uuid = driver = max_sm = max_mem = plimit = None
    h = _nvml_handle(index)
    if h is not None:
        n = _nvml()
        uuid = _text(_try(n.nvmlDeviceGetUUID, h))
        driver = _text(_try(n.nvmlSystemGetDriverVersion))
        max_sm = _try(n.nvmlDeviceGetMaxClockInfo, h, n.NVML_CLOCK_SM)
        max_mem = _try(n.nvmlDeviceGetMaxClockInfo, h, n.NVML_CLOCK_MEM)
        pl = _try(n.nvmlDeviceGetPowerManagementLimit, h)
        plimit = pl / 1000 if pl is not None else None
    return GpuIdentity(index, name, uuid, f"{major}.{minor}", int(mem), driver, max_sm, max_mem,
                       plimit)


def sample(index: int) -> GpuSample:
    """Clocks, temperature, power and throttle reasons of device ``index`` (empty without NVML)."""
    h = _nvml_handle(index)
    if h is None:
        return GpuSample()
    n = _nvml()
    mask = _try(n.nvmlDeviceGetCurrentClocksThrottleReasons, h)
    if mask is None:
        mask = _try(n.nvmlDeviceGetCurrentClocksEventReasons, h)
    reasons = tuple(r for r, bit in _THROTTLE_BITS.items() if mask is not None and mask & bit)
    power = _try(n.nvmlDeviceGetPowerUsage, h)
    return GpuSample(
        sm_clock_mhz=_try(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM),
        mem_clock_mhz=_try(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_MEM),
        temperature_c=_try(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU),
        power_w=power / 1000 if power is not None else None,
        throttle_reasons=reasons,
    )


def gpu_available() -> bool:
    """A CUDA device our kernels run on (not the interpreter)."""
    from gdn2_kernels import _device

    return _device.default_device().type == "cuda"


def visible_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if gpu_available() else []


def report() -> GpuReport:
    """Identity and one health sample of every visible GPU, or why there is none."""
    nv = nvml_status()
    if not gpu_available():
        why = ("no CUDA GPU visible to torch" if not torch.cuda.is_available()
               else "TRITON_INTERPRET=1: kernels run through the interpreter")
        return GpuReport(False, nv is None, f"no GPU: {why}; " + (nv or "NVML present"))
    devs = visible_devices()
    note = f"{len(devs)} GPU(s)" + (f"; no NVML: {nv} (no clocks/temperature/throttling)"
                                    if nv else "; NVML ok")
    return GpuReport(True, nv is None, note, [identify(i) for i in devs],
                     [sample(i) for i in devs])


__all__ = ["GpuIdentity", "GpuReport", "GpuSample", "gpu_available", "identify", "nvml_status",
           "report", "sample", "visible_devices"]
