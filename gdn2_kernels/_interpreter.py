"""Running our kernels through Triton's interpreter on CPU tensors, one launch at a time.

Nothing here runs at import, and nothing it changes outlives a launch: importing gdn2_kernels
sets no environment variable and patches nothing, so other libraries' Triton kernels in the same
process are untouched.

Per launch (:func:`launch`, called by ``_launch.launch`` when there is no CUDA device):

* The kernel runs as Triton's ``InterpretedFunction`` of its Python function. Triton chooses
  between compiling and interpreting when a function is decorated (``TRITON_INTERPRET``), so our
  kernels, their ``@triton.jit`` helpers and triton.language's own jit functions (``tl.cdiv``,
  the reductions' combine functions) are compiled ``JITFunction`` objects here. For the duration
  of the launch each of those, in the modules of triton.language and of this package, is replaced
  by an interpreted twin, and put back afterwards.
* Two interpreter bugs are worked around for the launch, as the hardware computes:
  - bf16 ``tl.dot``: the interpreter stores bf16 tensors as their uint16 bit patterns and its
    ``create_dot`` multiplies those integers (only fp8 operands are converted; seen with Triton
    3.9), so every bf16 dot returns garbage on the CPU while the same kernel is right on a GPU.
    The fix widens bf16 operands to fp32 (exact) before the product, which is what the GPU's bf16
    MMA with an fp32 accumulator computes.
  - fp32 -> bf16 casts: the interpreter truncates (rounds toward zero), while GPUs round to
    nearest even; truncation biases every bf16 store and roughly doubles bf16 errors on the CPU.
    The fix rounds to nearest even.

When the user chose the interpreter for the whole process (``TRITON_INTERPRET=1`` before the
import), the kernels are interpreted already; a launch then only carries the two fixes.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator

import numpy as np

_lock = threading.RLock()


def _bf16_bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits_rne(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(is_nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


@contextlib.contextmanager
def _bf16_fixes() -> Iterator[None]:
    """The interpreter's ``create_dot`` and ``cast_impl`` with the bf16 fixes, for the block."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    dot = getattr(builder, "create_dot", None)
    cast = getattr(builder, "cast_impl", None)
    if dot is None or cast is None:  # another interpreter: nothing to fix
        yield
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a = interp.TensorHandle(_bf16_bits_to_fp32(a.data), tl.float32)
        if b.dtype == tl.bfloat16:
            b = interp.TensorHandle(_bf16_bits_to_fp32(b.data), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interp.TensorHandle(_fp32_to_bf16_bits_rne(src.data), dst_type.scalar)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = dot, cast


_twins: dict[int, tuple[Any, Any]] = {}  # id(JITFunction) -> (it, its interpreted twin)


def twin(jit_fn: Any) -> Any:
    """The interpreted twin of a ``@triton.jit`` function (made once)."""
    hit = _twins.get(id(jit_fn))
    if hit is None:
        from triton.runtime.interpreter import InterpretedFunction

        hit = _twins[id(jit_fn)] = (jit_fn, InterpretedFunction(jit_fn.fn))
    return hit[1]


_warmed: list[bool] = []


def _warm_lazy_imports() -> None:
    """Import what Triton imports lazily at a launch before any function is swapped: a module
    imported while swapped would see twins where it checks for jit functions (Triton 3.9 imports
    its gluon package when it first mangles an argument type)."""
    if _warmed:
        return
    _warmed.append(True)
    import torch
    from triton.runtime import jit

    mangle = getattr(jit, "mangle_type", None)
    if mangle is not None:
        mangle(torch.empty(1))
        mangle(1)


@contextlib.contextmanager
def _twins_in_place() -> Iterator[None]:
    """Every ``JITFunction`` in triton.language and in this package replaced by its twin."""
    from triton.runtime.jit import JITFunction

    _warm_lazy_imports()
    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("triton.language")
                                  or name.split(".")[0] == "gdn2_kernels"):
            continue
        namespace = vars(module)
        for attr, value in list(namespace.items()):
            if isinstance(value, JITFunction):
                swapped.append((namespace, attr, value))
                namespace[attr] = twin(value)
    try:
        yield
    finally:
        for namespace, attr, value in swapped:
            namespace[attr] = value


def launch(kernel: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
    """``kernel[grid](**kwargs)`` through Triton's interpreter (see the module docstring)."""
    from triton.runtime.jit import JITFunction

    with _lock, _bf16_fixes():
        if not isinstance(kernel, JITFunction):  # interpreted already (TRITON_INTERPRET=1)
            kernel[grid](**kwargs)
            return
        with _twins_in_place():
            twin(kernel)[grid](**kwargs)
