"""``profile``: where the time of our forward (and backward) goes, stage by stage.

Stages are discovered, not listed: every public function of a module that defines a
``@triton.jit`` kernel is a launcher, and every reference to a launcher from the other
``gdn2_kernels`` modules (``ops``, the ``chunk_*`` orchestrators) is wrapped for the duration of
the profile with a pair of timing marks (CUDA events; ``time.perf_counter`` under the
interpreter). A backward written later is profiled the same way with no change here.

Per stage: the median time per pass over ``reps`` passes (L2 flushed before each pass), its share
of the summed stage time, the achieved GB/s (bytes of the tensors the launcher takes and returns)
and, for stages the model knows (``gdn2_kernels.bench.model.STAGE_FLOPS``), TFLOP/s. ``--ncu`` runs Nsight
Compute on one stage's kernel in a child process.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from gdn2_kernels.bench import model
from gdn2_kernels.bench.inputs import ProblemInputs
from gdn2_kernels.bench.model import Shape
from gdn2_kernels.options import OptionError, integer, one_of

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class StageStat:
    phase: str                 # "fwd" or "bwd"
    stage: str                 # launcher name
    calls: int                 # launches per pass
    ms: float                  # median per pass, all launches summed
    share: float               # percent of the summed stage time
    bytes: float
    gbps: float
    flops: float | None = None
    tflops: float | None = None


@dataclass
class NcuResult:
    stage: str
    command: str
    returncode: int
    report_path: str | None
    details: str


@dataclass
class ProfileReport:
    shape: Shape
    device: str
    interpreter: bool
    chunk_size: int
    config_source: str
    reps: int
    fwd_ms: float | None                    # end to end, median
    fwdbwd_ms: float | None
    backward_reason: str | None
    stages: list[StageStat] = field(default_factory=list)
    ncu: NcuResult | None = None

    @property
    def stage_ms(self) -> float:
        return sum(s.ms for s in self.stages)


# ------------------------------------------------------------------------------------------------
# Stage discovery
# ------------------------------------------------------------------------------------------------

def _is_kernel_module(mod) -> bool:
    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction

    return any(isinstance(v, KernelInterface) for v in vars(mod).values())


def _library_modules() -> list:
    import gdn2_kernels.kernels as kpkg
    import gdn2_kernels.ops  # noqa: F401  (the op and everything it imports)

    for m in pkgutil.iter_modules(kpkg.__path__):
        importlib.import_module(f"gdn2_kernels.kernels.{m.name}")
    return [m for n, m in sorted(sys.modules.items())
            if m is not None and (n == "gdn2_kernels" or n.startswith("gdn2_kernels."))]


def discover_launchers() -> list[tuple[Any, str, Callable]]:
    """``(module, attribute, launcher)`` for every launcher reference outside kernel modules."""
    mods = _library_modules()
    kernel_mods = {m.__name__ for m in mods if _is_kernel_module(m)}
    found = []
    for mod in mods:
        if mod.__name__ in kernel_mods:
            continue
        for name, obj in vars(mod).items():
            if (inspect.isfunction(obj) and obj.__module__ in kernel_mods
                    and not name.startswith("_") and not name.endswith("_grid")):
                found.append((mod, name, obj))
    return found


class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _tensor_bytes(*objs) -> int:
    seen: dict[tuple[int, int], int] = {}

    def visit(o):
        if isinstance(o, torch.Tensor):
            seen[(o.data_ptr(), o.nbytes)] = o.nbytes
        elif isinstance(o, (tuple, list)):
            for x in o:
                visit(x)
        elif isinstance(o, dict):
            for x in o.values():
                visit(x)
    for o in objs:
        visit(o)
    return sum(seen.values())


@dataclass
class _Record:
    rep: int
    phase: str
    stage: str
    start: Any
    end: Any
    bytes: int


@contextmanager
def instrument(clock: _Clock, state: dict) -> Iterator[list[_Record]]:
    """Wrap every launcher reference; records go to the yielded list while ``state['on']``."""
    records: list[_Record] = []
    patched = []

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if not state.get("on"):
                return fn(*args, **kwargs)
            start = clock.mark()
            out = fn(*args, **kwargs)
            end = clock.mark()
            records.append(_Record(state["rep"], state["phase"], name, start, end,
                                   _tensor_bytes(args, kwargs, out)))
            return out
        timed.__wrapped__ = fn
        return timed

    for mod, name, fn in discover_launchers():
        patched.append((mod, name, fn))
        setattr(mod, name, wrap(name, fn))
    try:
        yield records
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


# ------------------------------------------------------------------------------------------------
# Profile
# ------------------------------------------------------------------------------------------------

def _summarize(records: list[_Record], clock: _Clock, shape: Shape, C: int,
               reps: int) -> list[StageStat]:
    per: dict[tuple[str, str], dict[int, list[_Record]]] = {}
    for r in records:
        per.setdefault((r.phase, r.stage), {}).setdefault(r.rep, []).append(r)
    stats = []
    for (phase, stage), by_rep in per.items():
        times = [sum(clock.ms(r.start, r.end) for r in rs) for rs in by_rep.values()]
        first = next(iter(by_rep.values()))
        ms = statistics.median(times)
        nbytes = sum(r.bytes for r in first)
        fl = model.stage_flops(stage, shape.B, shape.T, shape.H, shape.D, shape.D, C)
        fl = None if fl is None else fl * len(first)
        w = model.Work(fl or 0.0, nbytes)
        stats.append(StageStat(phase, stage, len(first), ms, 0.0, nbytes, model.gbps(w, ms),
                               fl, model.tflops(w, ms) if fl is not None else None))
    total = sum(s.ms for s in stats) or 1.0
    for s in stats:
        s.share = 100.0 * s.ms / total
    order = {"fwd": 0, "bwd": 1}
    return sorted(stats, key=lambda s: (order.get(s.phase, 2), -s.ms))


# The default problem: the paper's layer on a GPU; under the interpreter (no GPU) one that a CPU
# runs in seconds (the GPU one would take hours there).
GPU_SHAPE, GPU_REPS = Shape(2, 8192), 20
CPU_SHAPE, CPU_REPS = Shape(1, 64, 1, 32, "float32"), 2


def default_problem(interpreter: bool) -> tuple[Shape, int]:
    """``(shape, reps)`` of a profile nobody sized: small under the interpreter."""
    return (CPU_SHAPE, CPU_REPS) if interpreter else (GPU_SHAPE, GPU_REPS)


def problem_from_options(shape: str | None, heads: int | None, dim: int | None,
                         dtype: str | None, reps: int | None,
                         interpreter: bool) -> tuple[Shape, int]:
    """``(shape, reps)`` of ``gdn2 profile``: the options given over :func:`default_problem`,
    checked (:class:`OptionError`)."""
    from gdn2_kernels.bench.runner import parse_shapes

    base, base_reps = default_problem(interpreter)
    if shape is not None:
        shapes = parse_shapes(shape, "--shape")
        if len(shapes) != 1:
            raise OptionError("--shape", f"give one BxT (e.g. 2x8192), got {shape!r}")
        base = dataclasses.replace(base, B=shapes[0][0], T=shapes[0][1])
    given = {"H": heads, "D": dim, "dtype": dtype}
    problem = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    reps = base_reps if reps is None else reps
    check_options(problem, reps)
    return problem, reps


def check_options(shape: Shape, reps: int) -> None:
    """Refuse a problem that cannot run, before any work (:class:`OptionError`)."""
    from gdn2_kernels.configs import KEY_DTYPES, MAX_HEAD_DIM

    integer(shape.B, "--shape (B)")
    integer(shape.T, "--shape (T)")
    integer(shape.H, "--heads")
    integer(shape.D, "--dim", 1, MAX_HEAD_DIM)
    one_of(shape.dtype, KEY_DTYPES, "--dtype")
    integer(reps, "--reps")


def profile(shape: Shape = GPU_SHAPE, backward: bool = True, reps: int = GPU_REPS,
            seed: int = 0, end_to_end: Callable[[Callable], tuple[float, float]] | None = None,
            ncu_stage: str | None = None, ncu_out: str | Path = "ncu") -> ProfileReport:
    """Per-stage breakdown of ``chunk_gdn2`` at ``shape`` (and its backward when it exists).

    ``end_to_end`` times a whole call (median, iqr); default: ``CudaMeasurer`` on a GPU, none
    under the interpreter. ``ncu_stage``: also run Nsight Compute on that stage's kernel, the
    report going to ``ncu_out``. The CLI takes :func:`default_problem` when no shape is given.
    """
    from gdn2_kernels import _device, dispatch
    from gdn2_kernels.configs import ProblemKey
    from gdn2_kernels.ops import chunk_gdn2

    check_options(shape, reps)

    device = _device.default_device()
    cuda = device.type == "cuda"
    clock = _Clock(cuda)
    pipe = dispatch.resolve(ProblemKey(shape.D, shape.D, shape.dtype))
    if end_to_end is None and cuda:
        from gdn2_kernels.bench.timing import CudaMeasurer

        end_to_end = CudaMeasurer().time_ms
    x = ProblemInputs(shape, device, seed).gdn2(grad=backward)
    leaves = [t for t in x.values() if t.requires_grad]

    def fwd():
        return chunk_gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"], validate_values=False)[0]

    o = fwd()
    do = torch.randn_like(o)
    backward_reason = None
    if backward:
        try:
            torch.autograd.grad(o, leaves, do)
        except NotImplementedError as exc:
            backward_reason = " ".join(str(exc).split())
    run_bwd = backward and backward_reason is None

    def fwdbwd():
        return torch.autograd.grad(fwd(), leaves, do)

    def fwd_only():
        with torch.no_grad():
            return fwd()

    fwd_ms = end_to_end(fwd_only)[0] if end_to_end else None
    fwdbwd_ms = end_to_end(fwdbwd)[0] if end_to_end and run_bwd else None

    flush = torch.empty(L2_FLUSH_BYTES if cuda else 1, dtype=torch.int8, device=device)
    state: dict = {"on": False}
    with instrument(clock, state) as records:
        for rep in range(reps):
            flush.zero_()
            state.update(on=True, rep=rep, phase="fwd")
            if run_bwd:
                out = fwd()
                state["phase"] = "bwd"
                torch.autograd.grad(out, leaves, do)
            else:
                fwd_only()
            state["on"] = False
        if cuda:
            torch.cuda.synchronize()
        stages = _summarize(records, clock, shape, pipe.chunk_size, reps)
    ncu = run_ncu(ncu_stage, shape, ncu_out, run_bwd) if ncu_stage else None
    return ProfileReport(shape, str(device), not cuda, pipe.chunk_size, pipe.source, reps,
                         fwd_ms, fwdbwd_ms, backward_reason if backward else None, stages, ncu)


# ------------------------------------------------------------------------------------------------
# Nsight Compute
# ------------------------------------------------------------------------------------------------

def ncu_target(B: int, T: int, H: int, D: int, dtype: str, backward: bool) -> None:
    """What ``ncu`` runs: two passes (the first compiles), so ``--launch-skip 1`` is warm."""
    shape = Shape(B, T, H, D, dtype)
    profile(shape, backward=backward, reps=2, end_to_end=lambda fn: (0.0, 0.0))


def run_ncu(stage: str, shape: Shape, out_dir: str | Path, backward: bool = False,
            ncu_set: str = "full") -> NcuResult:
    """Nsight Compute on the kernel of ``stage`` (``_<stage>_kernel``), second launch."""
    ncu = shutil.which("ncu")
    if ncu is None:
        raise RuntimeError("ncu (Nsight Compute) is not on PATH; install it or drop --ncu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = out / f"ncu_{stage}_{shape.label()}"
    code = (f"from gdn2_kernels.bench.profile import ncu_target; ncu_target({shape.B}, {shape.T}, {shape.H}, "
            f"{shape.D}, {shape.dtype!r}, {backward})")
    cmd = [ncu, "--set", ncu_set, "--kernel-name", f"regex:_{stage}_kernel", "--launch-skip",
           "1", "--launch-count", "1", "--force-overwrite", "--export", str(rep),
           sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    details = proc.stdout[-4000:] + proc.stderr[-2000:]
    report = Path(str(rep) + ".ncu-rep")
    if proc.returncode == 0 and report.is_file():
        page = subprocess.run([ncu, "--import", str(report), "--page", "details"],
                              capture_output=True, text=True)
        details = page.stdout or details
        (out / f"{report.stem}.txt").write_text(details)
    return NcuResult(stage, shlex.join(cmd), proc.returncode,
                     str(report) if report.is_file() else None, details)
