"""``gdn2 stages``: where the time of our forward (and backward) goes, stage by stage.

Launches are observed, not listed: every kernel launch goes through ``_launch.launch``, and for
the duration of the breakdown an observer (``_launch.observed``) puts a timing mark (CUDA event;
``time.perf_counter`` under the interpreter) before and after each one. A stage is a KernelSpec
(the kernel ``_<spec>_kernel`` and its parts ``_<spec>_<part>_kernel``); consecutive launches of
one stage form one call of it, timed from its first launch to its last (the two-level scan's
passes and the torch steps between them count as one call). A kernel written later is broken
down the same way with no change here.

Per stage: the median time per pass over ``reps`` passes (L2 flushed before each pass), its share
of the summed stage time, the achieved GB/s (bytes of the tensors its launches take) and, for
stages the model knows (``bench.model.STAGE_FLOPS``), TFLOP/s; and the configs as they launched
(``dispatch.launch_time``). ``--ncu`` runs Nsight Compute on one stage's kernel in a child process.
"""
from __future__ import annotations

import dataclasses
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gdn2_kernels import timing
from gdn2_kernels.bench import model
from gdn2_kernels.bench.inputs import ProblemInputs
from gdn2_kernels.bench.model import Shape
from gdn2_kernels.options import OptionError, integer, one_of, parse_shapes



@dataclass
class StageStat:
    phase: str                 # "fwd" or "bwd"
    stage: str                 # the KernelSpec whose kernels ran
    calls: int                 # calls per pass (runs of consecutive launches of the stage)
    ms: float                  # median per pass, all calls summed
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


SCHEMA = "gdn2.stages/1"  # the JSON report's layout (bench/render_results.py reads it)


@dataclass
class StagesReport:
    shape: Shape
    device: str
    interpreter: bool
    chunk_size: int
    config_source: str
    reps: int
    fwd_ms: float | None                    # end to end, median
    fwdbwd_ms: float | None
    backward: bool                          # the backward's stages are in ``stages``
    stages: list[StageStat] = field(default_factory=list)
    ncu: NcuResult | None = None
    # The configs as they launched (dispatch.launch_time) and what launch time changed.
    launched: dict[str, dict[str, Any]] = field(default_factory=dict)
    launch_changes: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    @property
    def stage_ms(self) -> float:
        return sum(s.ms for s in self.stages)


# ------------------------------------------------------------------------------------------------
# Observing the launches
# ------------------------------------------------------------------------------------------------

def stage_of(kernel_name: str) -> str:
    """The KernelSpec a kernel belongs to: ``_intra_bwd_pairwise_kernel`` -> ``intra_bwd``."""
    from gdn2_kernels.configs import all_specs

    stem = kernel_name.removeprefix("_").removesuffix("_kernel")
    for spec in all_specs():
        if stem == spec.name or any(stem == f"{spec.name}_{part}" for part in spec.parts):
            return spec.name
    return stem


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


@dataclass
class _Record:
    rep: int
    phase: str
    stage: str
    start: Any
    end: Any
    tensors: dict[tuple[int, int], int]  # (data_ptr, nbytes) -> nbytes, over the call's launches

    @property
    def bytes(self) -> int:
        return sum(self.tensors.values())


class StageTimer:
    """The ``_launch`` observer: one :class:`_Record` per call of a stage while ``on``."""

    def __init__(self, clock: _Clock):
        self.clock = clock
        self.records: list[_Record] = []
        self.on = False
        self.rep = 0
        self.phase = "fwd"
        self._open: _Record | None = None

    def start(self, rep: int, phase: str) -> None:
        self.on, self.rep, self.phase, self._open = True, rep, phase, None

    def set_phase(self, phase: str) -> None:
        self.phase, self._open = phase, None

    def stop(self) -> None:
        self.on, self._open = False, None

    def before(self, kernel, grid, kwargs) -> None:
        if not self.on:
            return
        from gdn2_kernels import _launch

        stage = stage_of(_launch.kernel_name(kernel))
        r = self._open
        if r is None or (r.rep, r.phase, r.stage) != (self.rep, self.phase, stage):
            r = self._open = _Record(self.rep, self.phase, stage, self.clock.mark(), None, {})
            self.records.append(r)
        for value in kwargs.values():
            if isinstance(value, torch.Tensor):
                r.tensors[(value.data_ptr(), value.nbytes)] = value.nbytes

    def after(self, kernel, grid, kwargs) -> None:
        if self.on and self._open is not None:
            self._open.end = self.clock.mark()


# ------------------------------------------------------------------------------------------------
# The breakdown
# ------------------------------------------------------------------------------------------------

def _summarize(records: list[_Record], clock: _Clock, shape: Shape, chunk_size: int,
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
        fl = model.stage_flops(stage, shape.B, shape.T, shape.H, shape.D, shape.D, chunk_size)
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
    """``(shape, reps)`` of a breakdown nobody sized: small under the interpreter."""
    return (CPU_SHAPE, CPU_REPS) if interpreter else (GPU_SHAPE, GPU_REPS)


def problem_from_options(shape: str | None, heads: int | None, dim: int | None,
                         dtype: str | None, reps: int | None,
                         interpreter: bool) -> tuple[Shape, int]:
    """``(shape, reps)`` of ``gdn2 stages``: the options given over :func:`default_problem`,
    checked (:class:`OptionError`)."""
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


def breakdown(shape: Shape = GPU_SHAPE, backward: bool = True, reps: int = GPU_REPS,
              seed: int = 0, end_to_end: Callable[[Callable], tuple[float, float]] | None = None,
              ncu_stage: str | None = None, ncu_out: str | Path = "ncu") -> StagesReport:
    """Per-stage breakdown of ``chunk_gdn2`` at ``shape`` (and of its backward).

    ``end_to_end`` times a whole call (median, iqr); default: ``CudaMeasurer`` on a GPU, none
    under the interpreter. ``ncu_stage``: also run Nsight Compute on that stage's kernel, the
    report going to ``ncu_out``. The CLI takes :func:`default_problem` when no shape is given.
    """
    from gdn2_kernels import _device, _launch, dispatch
    from gdn2_kernels.configs import ProblemKey
    from gdn2_kernels.ops import chunk_gdn2

    check_options(shape, reps)

    device = _device.default_device()
    cuda = device.type == "cuda"
    pipe = dispatch.resolve(ProblemKey(shape.D, shape.D, shape.dtype))
    launched = dispatch.launch_time(pipe, shape.B, shape.H, shape.T, shape.D, device)
    if end_to_end is None and cuda:
        from gdn2_kernels.bench.timing import CudaMeasurer

        end_to_end = CudaMeasurer().time_ms
    x = ProblemInputs(shape, device, seed).gdn2(grad=backward)
    leaves = [t for t in x.values() if t.requires_grad]

    def fwd():
        return chunk_gdn2(x["q"], x["k"], x["v"], x["g"], x["b"], x["w"], validate_values=False)[0]

    o = fwd()
    do = torch.randn_like(o)

    def fwdbwd():
        return torch.autograd.grad(fwd(), leaves, do)

    def fwd_only():
        with torch.no_grad():
            return fwd()

    fwd_ms = end_to_end(fwd_only)[0] if end_to_end else None
    fwdbwd_ms = end_to_end(fwdbwd)[0] if end_to_end and backward else None

    flush = torch.empty(timing.L2_FLUSH_BYTES if cuda else 1, dtype=torch.int8, device=device)
    clock = _Clock(cuda)
    with _launch.observed(StageTimer(clock)) as timer:
        for rep in range(reps):
            flush.zero_()
            timer.start(rep, "fwd")
            if backward:
                out = fwd()
                timer.set_phase("bwd")
                torch.autograd.grad(out, leaves, do)
            else:
                fwd_only()
            timer.stop()
    if cuda:
        torch.cuda.synchronize()
    stages = _summarize(timer.records, clock, shape, pipe.chunk_size, reps)
    ncu = run_ncu(ncu_stage, shape, ncu_out, backward) if ncu_stage else None
    return StagesReport(shape, str(device), not cuda, pipe.chunk_size, pipe.source, reps,
                        fwd_ms, fwdbwd_ms, backward, stages, ncu,
                        {n: c.as_dict() for n, c in launched.pipeline.configs
                         if any(st.stage == n for st in stages)}, list(launched.changes))


# ------------------------------------------------------------------------------------------------
# Nsight Compute
# ------------------------------------------------------------------------------------------------

def ncu_target(B: int, T: int, H: int, D: int, dtype: str, backward: bool) -> None:
    """What ``ncu`` runs: two passes (the first compiles), so ``--launch-skip 1`` is warm."""
    shape = Shape(B, T, H, D, dtype)
    breakdown(shape, backward=backward, reps=2, end_to_end=lambda fn: (0.0, 0.0))


def run_ncu(stage: str, shape: Shape, out_dir: str | Path, backward: bool = False,
            ncu_set: str = "full") -> NcuResult:
    """Nsight Compute on the kernel of ``stage`` (``_<stage>_kernel``), second launch."""
    ncu = shutil.which("ncu")
    if ncu is None:
        raise RuntimeError("ncu (Nsight Compute) is not on PATH; install it or drop --ncu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = out / f"ncu_{stage}_{shape.label()}"
    code = (f"from gdn2_kernels.bench.stages import ncu_target; "
            f"ncu_target({shape.B}, {shape.T}, {shape.H}, {shape.D}, {shape.dtype!r}, {backward})")
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
