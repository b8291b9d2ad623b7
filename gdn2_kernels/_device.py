"""Device helpers: where kernels run and what the GPU is."""
from __future__ import annotations

import contextlib
import functools

import torch

from gdn2_kernels import _env, _launch


def interpreter_active() -> bool:
    """True when our kernels run through Triton's interpreter on the CPU: without a CUDA device
    (each launch on CPU tensors is interpreted, ``_interpreter``), or when the user set
    ``TRITON_INTERPRET=1``; ``TRITON_INTERPRET=0`` keeps it off."""
    choice = _env.interpreter_choice()
    return choice if choice is not None else not torch.cuda.is_available()


def default_device() -> torch.device:
    """The device our kernels run on: the current CUDA device, else the CPU (interpreter)."""
    if torch.cuda.is_available() and not interpreter_active():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current device for the block (Triton launches on the current device,
    so tensors on another GPU would otherwise be read by a kernel running elsewhere)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def current_index() -> int:
    """Index of the current CUDA device (0 without one): the GPU whose configs apply."""
    if torch.cuda.is_available() and not interpreter_active():
        return torch.cuda.current_device()
    return 0


@functools.lru_cache(maxsize=None)
def gpu_name(index: int = 0) -> str:
    """Marketing name of a CUDA device ('NVIDIA H100 80GB HBM3'); 'cpu-interpreter' without one."""
    if torch.cuda.is_available() and not interpreter_active():
        return torch.cuda.get_device_name(index)
    return "cpu-interpreter"


@functools.lru_cache(maxsize=None)
def arch(index: int = 0) -> str:
    """Compute capability as 'sm90'; 'cpu' under the interpreter."""
    if torch.cuda.is_available() and not interpreter_active():
        major, minor = torch.cuda.get_device_capability(index)
        return f"sm{major}{minor}"
    return "cpu"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of the CUDA device ``device``; None for the CPU (interpreter).
    A meta tensor's device inside a compile-ahead walk stands for the GPU being walked."""
    device = _launch.walk_device(device)
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def sanitize_gpu_name(name: str) -> str:
    """File-system and vLLM friendly form: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name.strip())
