"""Weak and strong scaling of context-parallel ``chunk_gdn2_cp`` on the GPUs of one host.

    torchrun --standalone --nproc_per_node N -m gdn2_kernels.bench.cp_scaling \
        [--out FILE.json] [options]

One launch measures every world size w in 1, 2, 4, ... up to N (and N) through process subgroups
of the first w ranks: *weak* scaling keeps ``--tokens-per-gpu`` per rank (one sequence of
w x that many tokens), *strong* scaling splits one sequence of ``--total-tokens`` over the w ranks.
w = 1 is the single-device ``chunk_gdn2`` on the whole sequence (the baseline). For each (run,
mode) the table gives the slowest rank's median time, the time the op spent in its exchanges
(the all-gathers as the compute stream saw them: transfer plus waiting for the slowest rank),
the same all-gather measured alone, tokens/s and the scaling efficiency (weak: t1 / tw; strong:
t1 / (w tw)). The op runs with ``validate_values=False`` (no agreement all-gather, no syncs).

Without torchrun, CUDA or enough GPUs it stops with a message (exit status 2). The pure parts
(options, the plan of runs, the environment check, the summary and efficiency) are tested on the
CPU (tests/bench/test_cp_scaling.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

if __package__ in (None, ""):       # run as a script by torchrun: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("weak", "strong")
MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class ScalingOptions:
    tokens_per_gpu: int = 16384
    total_tokens: int = 65536
    heads: int = 16
    dim: int = 128
    dtype: str = "bfloat16"
    layout: str = "contiguous"
    kinds: tuple[str, ...] = KINDS
    modes: tuple[str, ...] = MODES
    warmup: int = 3
    reps: int = 20
    out: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> ScalingOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens-per-gpu", type=int, default=ScalingOptions.tokens_per_gpu,
                   help="weak scaling: tokens each rank holds")
    p.add_argument("--total-tokens", type=int, default=ScalingOptions.total_tokens,
                   help="strong scaling: tokens of the one sequence split over the ranks")
    p.add_argument("--heads", type=int, default=ScalingOptions.heads)
    p.add_argument("--dim", type=int, default=ScalingOptions.dim, help="K = V")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   default=ScalingOptions.dtype)
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default=ScalingOptions.layout)
    p.add_argument("--kinds", default=",".join(KINDS), help="weak,strong (comma-separated)")
    p.add_argument("--modes", default=",".join(MODES), help="fwd,fwdbwd (comma-separated)")
    p.add_argument("--warmup", type=int, default=ScalingOptions.warmup)
    p.add_argument("--reps", type=int, default=ScalingOptions.reps)
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0 writes it)")
    a = p.parse_args(argv)
    kinds, modes = tuple(a.kinds.split(",")), tuple(a.modes.split(","))
    for name, got, allowed in (("--kinds", kinds, KINDS), ("--modes", modes, MODES)):
        if not got or any(x not in allowed for x in got):
            p.error(f"{name} takes a comma-separated subset of {','.join(allowed)}, got {got}")
    for name, value in (("--tokens-per-gpu", a.tokens_per_gpu), ("--total-tokens", a.total_tokens),
                        ("--heads", a.heads), ("--dim", a.dim), ("--reps", a.reps)):
        if value < 1:
            p.error(f"{name} must be positive, got {value}")
    return ScalingOptions(a.tokens_per_gpu, a.total_tokens, a.heads, a.dim, a.dtype, a.layout,
                          kinds, modes, max(0, a.warmup), a.reps, a.out)


def world_sizes(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself."""
    sizes, w = [], 1
    while w < n:
        sizes.append(w)
        w *= 2
    return sizes + [n]


@dataclass(frozen=True)
class Run:
    kind: str          # "weak" or "strong"
    ranks: int
    T_total: int

    @property
    def T_local(self) -> int:
        return self.T_total // self.ranks


def plan(options: ScalingOptions, n: int) -> list[Run]:
    """Every run of one launch on ``n`` GPUs; raises ValueError when a sequence cannot be cut
    into the layout's equal slots."""
    slots_per_rank = 1 if options.layout == "contiguous" else 2
    runs = []
    for kind in options.kinds:
        for w in world_sizes(n):
            T = options.tokens_per_gpu * w if kind == "weak" else options.total_tokens
            if T % (w * slots_per_rank):
                raise ValueError(f"{kind} scaling on {w} GPUs: {T} tokens do not split into "
                                 f"{w * slots_per_rank} equal {options.layout} slots; choose "
                                 "token counts divisible by 2 x the GPU count")
            runs.append(Run(kind, w, T))
    return runs


def environment_problem(env: Mapping[str, str], cuda_devices: int) -> str | None:
    """Why this process cannot run the benchmark (None: it can)."""
    if "RANK" not in env or "WORLD_SIZE" not in env or "LOCAL_RANK" not in env:
        return ("gdn2_kernels.bench.cp_scaling runs under torchrun: torchrun --standalone "
                "--nproc_per_node N -m gdn2_kernels.bench.cp_scaling")
    world = int(env["WORLD_SIZE"])
    if int(env.get("LOCAL_WORLD_SIZE", world)) != world:
        return (f"gdn2_kernels.bench.cp_scaling measures the GPUs of one host; WORLD_SIZE {world} "
                "spans hosts")
    if cuda_devices < world:
        return (f"gdn2_kernels.bench.cp_scaling needs one GPU per rank: {world} ranks but "
                f"{cuda_devices} CUDA device(s) visible on this host")
    return None


@dataclass
class Row:
    kind: str
    ranks: int
    T_total: int
    T_local: int
    mode: str
    ms: float                     # slowest rank's median step time
    exchange_ms: float | None     # median per step, slowest rank: the op's all-gathers
    allgather_ms: float | None    # the same all-gather alone (one direction)
    tokens_per_s: float
    efficiency: float | None = None
    per_rank_ms: list[float] = field(default_factory=list)


def summarize(run: Run, mode: str, per_rank: Sequence[Mapping[str, float | None]]) -> Row:
    """One row from every participating rank's medians (``ms``, ``exchange_ms``,
    ``allgather_ms``): the slowest rank decides."""
    ms = max(r["ms"] for r in per_rank)

    def slowest(key: str) -> float | None:
        vals = [r[key] for r in per_rank if r.get(key) is not None]
        return max(vals) if vals else None

    return Row(run.kind, run.ranks, run.T_total, run.T_local, mode, ms, slowest("exchange_ms"),
               slowest("allgather_ms"), run.T_total / (ms * 1e-3),
               per_rank_ms=[r["ms"] for r in per_rank])


def fill_efficiency(rows: list[Row]) -> None:
    """Weak: t1 / tw; strong: t1 / (w tw); None without the one-GPU row of the same kind/mode."""
    base = {(r.kind, r.mode): r.ms for r in rows if r.ranks == 1}
    for r in rows:
        t1 = base.get((r.kind, r.mode))
        if t1 is not None:
            r.efficiency = t1 / r.ms if r.kind == "weak" else t1 / (r.ranks * r.ms)


def render(rows: Sequence[Row]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    head = f"{'kind':6} {'GPUs':>4} {'T_total':>8} {'mode':7} {'ms':>9} {'exch ms':>8} " \
           f"{'AG ms':>7} {'Mtok/s':>8} {'eff':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.kind:6} {r.ranks:>4} {r.T_total:>8} {r.mode:7} {r.ms:>9.3f} "
                     f"{f(r.exchange_ms, '>8.3f')} {f(r.allgather_ms, '>7.3f')} "
                     f"{r.tokens_per_s / 1e6:>8.2f} {f(r.efficiency, '>5.2f')}")
    return "\n".join(lines)


def median_ms(times: Sequence[float]) -> float:
    return float(statistics.median(times))


# ------------------------------------------------------------------------------------------------
# The measurement (GPUs only)
# ------------------------------------------------------------------------------------------------

def _step(run: Run, mode: str, options: ScalingOptions, group, rank: int) -> Callable[[], None]:
    import torch

    from gdn2_kernels import chunk_gdn2
    from gdn2_kernels.inputs import make_inputs
    from gdn2_kernels.cp import build_cp_context, chunk_gdn2_cp

    dt = getattr(torch, options.dtype)
    D = options.dim
    x = make_inputs(1, run.T_local, options.heads, D, D, dt, "cuda", seed=1000 + rank)
    leaves = [t.requires_grad_(mode == "fwdbwd") for t in (x.q, x.k, x.v, x.g, x.b, x.w)]
    do = torch.randn_like(x.v)
    if run.ranks == 1:
        def forward():
            return chunk_gdn2(*leaves, validate_values=False)[0]
    else:
        ctx = build_cp_context([0, run.T_total], group=group, layout=options.layout)

        def forward():
            return chunk_gdn2_cp(*leaves, validate_values=False, cp_context=ctx)[0]

    def step() -> None:
        o = forward()
        if mode == "fwdbwd":
            o.backward(do)
            for t in leaves:
                t.grad = None
    return step


def _time(step: Callable[[], None], options: ScalingOptions, group, exchanges: list) -> dict:
    import torch
    import torch.distributed as dist

    for _ in range(options.warmup):
        step()
    times, exch = [], []
    for _ in range(options.reps):
        dist.barrier(group=group)
        torch.cuda.synchronize()
        exchanges.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        exch.append(sum(a.elapsed_time(b) for a, b in exchanges))
    return {"ms": median_ms(times), "exchange_ms": median_ms(exch) if any(exch) else None}


def _allgather_alone(run: Run, options: ScalingOptions, group) -> float | None:
    """The op's forward exchange (one summary per slot held, H x K x (K + V) fp32) alone."""
    import torch
    import torch.distributed as dist

    from gdn2_kernels.cp import comm

    if run.ranks == 1:
        return None
    parts = 1 if options.layout == "contiguous" else 2
    buf = torch.randn(parts, options.heads, options.dim, 2 * options.dim, device="cuda")
    for _ in range(options.warmup + 1):
        comm.all_gather(buf, group)
    times = []
    for _ in range(options.reps):
        dist.barrier(group=group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        comm.all_gather(buf, group)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return median_ms(times)


def _record_exchanges(exchanges: list) -> None:
    """Wrap the op's all-gather so each call leaves a pair of CUDA events in ``exchanges``."""
    import torch

    from gdn2_kernels.cp import comm

    real = comm.all_gather

    def timed(x, group):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real(x, group)
        end.record()
        exchanges.append((start, end))
        return out

    comm.all_gather = timed


def measure(options: ScalingOptions) -> list[Row] | None:
    """Every run on this launch's GPUs; the rows on rank 0, None elsewhere."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    runs = plan(options, world)
    groups = {w: dist.new_group(list(range(w))) for w in world_sizes(world)}  # all ranks, in order
    exchanges: list = []
    _record_exchanges(exchanges)
    rows = []
    for run in runs:
        for mode in options.modes:
            got = None
            if rank < run.ranks:
                group = groups[run.ranks]
                got = _time(_step(run, mode, options, group, rank), options, group, exchanges)
                got["allgather_ms"] = _allgather_alone(run, options, group)
                torch.cuda.empty_cache()
            per_rank = [None] * world
            dist.all_gather_object(per_rank, got)
            if rank == 0:
                row = summarize(run, mode, [r for r in per_rank if r is not None])
                rows.append(row)
                print(f"{run.kind} {run.ranks} GPUs T={run.T_total} {mode}: {row.ms:.3f} ms",
                      flush=True)
    dist.destroy_process_group()
    if rank != 0:
        return None
    fill_efficiency(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        import torch
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        devices = 0
    problem = environment_problem(os.environ, devices)
    if problem is None:
        try:
            plan(options, int(os.environ["WORLD_SIZE"]))
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rows = measure(options)
    if rows is not None:
        print(render(rows))
        if options.out:
            from gdn2_kernels.bench import provenance

            with open(options.out, "w") as f:
                json.dump({"kind": "cp_scaling", "options": asdict(options),
                           "provenance": provenance.collect(),
                           "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
