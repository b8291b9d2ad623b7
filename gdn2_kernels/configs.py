"""KernelSpec registry: every kernel's tunable parameters, constraints and checks.

A :class:`KernelSpec` is data. It names the kernel (same stem as the Triton kernel, STYLE 8),
lists the parameters with candidate values and a default that is correct everywhere, the
constraints between them (named predicates with a reason), the tuning key, and the output
tensors a candidate must reproduce. No config is refused by GPU architecture: the hazards known
on Hopper need no rule (:data:`HOPPER_NOTE`), and every config is verified before it is used.
The tuner enumerates :meth:`KernelSpec.space`; ``dispatch`` resolves one :class:`KernelConfig`
per launch; kernels receive that resolved config.

``BT`` (the chunk size) is pipeline-wide: every stage of the forward and backward of one call uses
the same value, because the stages exchange per-chunk intermediates.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from gdn2_kernels._parallel import NARROW_MAX_WARPS
from gdn2_kernels.accuracy import TOLERANCES

MAX_HEAD_DIM = 256
# The input dtypes a problem key (and so a tuned config) can have, as torch names them.
KEY_DTYPES = ("bfloat16", "float16", "float32")


def dtype_name(dtype) -> str:
    """A torch dtype as problem keys and tolerance tables spell it: 'bfloat16', 'float32'."""
    return str(dtype).removeprefix("torch.")


def short_dtype_name(dtype) -> str:
    """'fp32', 'bf16', 'fp16', 'fp64': the dtype in readable test ids and labels."""
    return dtype_name(dtype).replace("float", "fp").replace("bfp", "bf")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class ProblemKey:
    """What a tuned config is keyed on: head dims and input dtype (never B or T)."""

    K: int
    V: int
    dtype: str  # torch dtype name without the prefix: 'bfloat16', 'float16', 'float32'

    def as_dict(self) -> dict[str, Any]:
        return {"K": self.K, "V": self.V, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProblemKey":
        return cls(int(d["K"]), int(d["V"]), str(d["dtype"]))

    @classmethod
    def of(cls, k, v) -> "ProblemKey":
        """The key of a call with keys ``k`` ``[.., K]`` and values ``v`` ``[.., V]``."""
        return cls(k.shape[-1], v.shape[-1], dtype_name(k.dtype))


@dataclass(frozen=True)
class Param:
    """One tunable. ``launch`` params (num_warps, num_stages) go to the launcher, not the kernel."""

    name: str
    values: tuple
    default: Any
    doc: str
    launch: bool = False
    pipeline_wide: bool = False
    # An algorithm choice rather than a size: the tuner also tries every pinned config (default,
    # configs in use, shipped profiles) with each other value of it, so a sampled tune always
    # measures the alternative algorithm on tiles known to be good.
    algorithm: bool = False
    # False: the tuner keeps the default (a choice its problem cannot tell apart, such as one
    # that only acts on under-filled GPUs); profiles and overrides may still set it.
    tuned: bool = True


@dataclass(frozen=True)
class Constraint:
    """A relation the config must satisfy; ``allows(config, key)`` is True when it holds."""

    name: str
    reason: str
    allows: Callable[[Mapping[str, Any], ProblemKey], bool]


def version_tuple(v: str) -> tuple[int, ...]:
    """'3.6.0+git1' -> (3, 6, 0); missing parts are 0. Used for Triton and package versions."""
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        out.append(int(digits or 0))
    return tuple(out + [0] * (3 - len(out)))


@dataclass(frozen=True)
class KernelConfig:
    """A resolved config for one kernel: every parameter of its spec with one value."""

    kernel: str
    values: tuple[tuple[str, Any], ...]

    def __getitem__(self, name: str) -> Any:
        for k, v in self.values:
            if k == name:
                return v
        raise KeyError(f"{self.kernel} config has no parameter {name!r}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def constexprs(self) -> dict[str, Any]:
        """The kernel's constexpr tunables (everything but num_warps/num_stages)."""
        launch = {p.name for p in get_spec(self.kernel).params if p.launch}
        return {k: v for k, v in self.values if k not in launch}

    def launch_options(self) -> dict[str, int]:
        d = self.as_dict()
        return {"num_warps": int(d["num_warps"]), "num_stages": int(d["num_stages"])}

    def replace(self, **changes: Any) -> "KernelConfig":
        d = self.as_dict()
        unknown = set(changes) - set(d)
        if unknown:
            raise KeyError(f"{self.kernel} has no parameter(s) {sorted(unknown)}")
        d.update(changes)
        return KernelConfig(self.kernel, tuple(d.items()))

    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values)


@dataclass(frozen=True)
class Pruned:
    config: KernelConfig
    rule: str
    reason: str


@dataclass(frozen=True)
class SpaceReport:
    """The enumerated space of one kernel for one problem and device: kept and pruned configs."""

    kernel: str
    valid: tuple[KernelConfig, ...]
    pruned: tuple[Pruned, ...]

    @property
    def total(self) -> int:
        return len(self.valid) + len(self.pruned)


@dataclass(frozen=True)
class KernelSpec:
    """Declaration of a kernel's tuning space (see module docstring)."""

    name: str
    direction: str  # 'fwd' or 'bwd'
    doc: str
    params: tuple[Param, ...]
    outputs: tuple[str, ...]
    constraints: tuple[Constraint, ...] = ()
    key_fields: tuple[str, ...] = ("K", "V", "dtype")
    op: str = "chunk"  # the public op that launches it: 'chunk' (chunk_gdn2) or 'recurrent'
    # Further kernels the same launcher starts under this config, ``_<name>_<part>_kernel``.
    parts: tuple[str, ...] = ()
    # A serial pass over the sequence: its launcher narrows BV (and caps num_warps) when the
    # programs would leave SMs idle (_parallel.serial_launch; dispatch.launch_time reports it).
    serial: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no parameter {name!r}; it has {[p.name for p in self.params]}")

    def default_config(self, **fixed: Any) -> KernelConfig:
        values = {p.name: p.default for p in self.params}
        values.update(fixed)
        return KernelConfig(self.name, tuple(values.items()))

    def config(self, values: Mapping[str, Any]) -> KernelConfig:
        """Build a config from a mapping; missing params take their default, unknown ones raise."""
        names = [p.name for p in self.params]
        unknown = set(values) - set(names)
        if unknown:
            raise KeyError(f"{self.name} has no parameter(s) {sorted(unknown)}; it has {names}")
        return self.default_config(**dict(values))

    def tolerance(self, output: str, dtype: str) -> float:
        return TOLERANCES[dtype][output]

    def check(self, config: KernelConfig, key: ProblemKey) -> Pruned | None:
        """The first value or constraint that refuses ``config``, or None if it is allowed."""
        d = config.as_dict()
        for p in self.params:
            if d[p.name] not in p.values:
                return Pruned(config, "value", f"{p.name}={d[p.name]} is not one of {p.values}")
        for c in self.constraints:
            if not c.allows(d, key):
                return Pruned(config, c.name, c.reason)
        return None

    def _all(self, fixed: Mapping[str, Any]) -> Iterator[KernelConfig]:
        grids = [(p.name, (fixed[p.name],) if p.name in fixed
                  else p.values if p.tuned else (p.default,)) for p in self.params]
        for combo in itertools.product(*(vals for _, vals in grids)):
            yield KernelConfig(self.name, tuple(zip((n for n, _ in grids), combo)))

    def space(self, key: ProblemKey, **fixed: Any) -> SpaceReport:
        """Enumerate the space (``fixed`` pins parameters, e.g. BT=64), pruning with reasons."""
        valid, pruned = [], []
        for cfg in self._all(fixed):
            refusal = self.check(cfg, key)
            (valid.append(cfg) if refusal is None else pruned.append(refusal))
        return SpaceReport(self.name, tuple(valid), tuple(pruned))


_REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"kernel spec {spec.name!r} is already registered")
    for p in spec.params:
        if p.default not in p.values:
            raise ValueError(f"{spec.name}.{p.name}: default {p.default!r} not among {p.values}")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> KernelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no kernel spec {name!r}; available: {sorted(_REGISTRY)}") from None


def all_specs(direction: str | None = None) -> list[KernelSpec]:
    return [s for s in _REGISTRY.values() if direction in (None, s.direction)]


# ---------------------------------------------------------------------------------------------
# Shared parameters and constraints
# ---------------------------------------------------------------------------------------------

CHUNK_SIZES = (16, 32, 64, 128)
DEFAULT_CHUNK_SIZE = 64

BT = Param("BT", CHUNK_SIZES, DEFAULT_CHUNK_SIZE,
           "chunk size C: tokens per chunk (pipeline-wide)", pipeline_wide=True)


def _warps(default: int = 4, values: tuple = (2, 4, 8)) -> Param:
    return Param("num_warps", values, default, "warps per program", launch=True)


def _stages(default: int = 2, values: tuple = (1, 2, 3)) -> Param:
    return Param("num_stages", values, default, "software-pipelining depth of loops", launch=True)


# The launch-time rule every serial pass's BV is subject to (said once, in each BV's doc).
_NARROWED = (f"; narrowed at launch, with at most {NARROW_MAX_WARPS} warps, when the programs "
             "would cover < half the SMs (_parallel.serial_launch)")


def _scan(direction: str) -> Param:
    """The state passes' SCAN: their one ``direction`` pass, or the two-level scan."""
    return Param("SCAN", ("serial", "segmented"), "serial",
                 f"one {direction} pass over the chunks, or a two-level scan over segments when "
                 "the serial pass would leave half the SMs idle (_parallel.segment_chunks); not "
                 "tuned: the tune's problem fills the GPU, where both are the same", tuned=False)


def _tile_fits(tile: str, dim: str) -> Constraint:
    return Constraint(
        f"{tile}_le_{dim}",
        f"{tile} larger than {dim} rounded up to a power of two only adds masked work",
        lambda c, k: c[tile] <= max(16, next_pow2(getattr(k, dim))),
    )


def _register_budget(name: str, elems: Callable[[Mapping[str, Any], ProblemKey], int],
                     limit: int = 160) -> Constraint:
    """fp32 register tiles per thread must stay under ``limit`` (spills above it)."""
    return Constraint(
        name,
        f"live fp32 tiles need more than {limit} registers per thread (spills)",
        lambda c, k: elems(c, k) / (32 * c["num_warps"]) <= limit,
    )


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------

INTRA_FWD = register(KernelSpec(
    name="intra_fwd",
    direction="fwd",
    doc="cumsum of g, T and A_qk, A = (I+T)^-1, Y = A E_bar, U = A Z (one program per chunk, head)",
    params=(
        BT,
        Param("BC", (16, 32), 16, "sub-chunk rows: diagonal blocks inverted on chip"),
        Param("BK", (16, 32, 64), 32, "key-axis tile of the T/A_qk products and of Y"),
        Param("BV", (16, 32, 64), 32, "value-axis tile of U"),
        Param("SOLVE_PRECISION", ("ieee", "tf32x3", "tf32"), "tf32x3",
              "precision of the dots that invert and merge the (I+T)^-1 blocks"),
        Param("DIAG_INVERSE", ("substitution", "doubling"), "substitution",
              "diagonal-block inverse: BC-1 row steps, or log2(BC) levels of dots",
              algorithm=True),
        _warps(),
        _stages(),
    ),
    outputs=("g_cum", "A", "A_qk", "Y", "U"),
    constraints=(
        Constraint("BC_divides_BT", "sub-chunks must tile the chunk", lambda c, k: c["BC"] <= c["BT"]
                   and c["BT"] % c["BC"] == 0),
        _tile_fits("BK", "K"),
        _tile_fits("BV", "V"),
        _register_budget("intra_fwd_registers",
                         lambda c, k: 3 * c["BT"] * c["BT"] + 4 * c["BT"] * max(c["BK"], c["BV"])),
    ),
))

STATE_FWD = register(KernelSpec(
    name="state_fwd",
    direction="fwd",
    doc="inter-chunk state pass fused with the output: R, O, S_C per chunk (serial over chunks)",
    params=(
        BT,
        Param("BV", (16, 32, 64), 32,
              "value-axis tile of the state: programs = N*H*V/BV" + _NARROWED),
        _scan("serial"),
        _warps(),
        _stages(2, (1, 2, 3, 4)),
    ),
    serial=True,
    outputs=("o", "ht"),
    constraints=(
        _tile_fits("BV", "V"),
        _register_budget("state_fwd_registers",
                         lambda c, k: 2 * next_pow2(k.K) * c["BV"] + 4 * c["BT"] * next_pow2(k.K)),
    ),
))

L2NORM_FWD = register(KernelSpec(
    name="l2norm_fwd",
    direction="fwd",
    doc="row-wise L2 normalisation of q and k (use_qk_l2norm_in_kernel)",
    params=(
        Param("BR", (8, 16, 32), 16, "rows per program"),
        _warps(4, (1, 2, 4, 8)),
        Param("num_stages", (1,), 1, "unused (no loop)", launch=True),
    ),
    outputs=("qn",),
))

# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------

# Hopper (sm90) hazards reported for this kind of kernel (issue 3), and why no config is pruned
# for them: every config is verified numerically before use, and one that fails to compile or
# faults is recorded by the tuner (compile_error, crash) and never chosen.
HOPPER_NOTE = (
    "No kernel transposes an mma accumulator: Triton 3.4 to 3.7.0 miscompile that pattern on sm90 "
    "(issue 3). Transposed products are formed from loaded operands instead, so no config needs "
    "pruning for it. 8-warp schedules of a 64x64 WY backward are reported to trip a WGMMA layout "
    "assertion; our intra_bwd with num_warps=8 and BT=64 compiled and reproduced the default "
    "config's gradients (max rel diff 3.4e-7) on an H200 with Triton 3.6.0 (2026-11-26). A "
    "state_bwd variant that loaded Q_gamma/K_tail (instead of forming them from q, k, g_cum) "
    "faulted on sm90 with Triton 3.6 (compute-sanitizer: out-of-range shared or local address in "
    "the dS update, 255 registers with spills; 2026-11-26), when the loop also recomputed R from "
    "h. state_bwd's OPERANDS chooses between the two (default formed)."
)

STATE_BWD = register(KernelSpec(
    name="state_bwd",
    direction="bwd",
    doc="reverse state pass: dR and dS' per chunk, dh0 (serial over chunks, parallel over V)",
    params=(
        BT,
        Param("BV", (16, 32, 64), 32, "value-axis tile of the state gradient" + _NARROWED),
        Param("OPERANDS", ("formed", "loaded"), "formed",
              "Q_gamma, K_tail, gamma_C formed from q, k, g_cum in the loop, or read from the "
              "forward (no exponentials in the serial loop)", algorithm=True),
        _scan("reverse"),
        _warps(),
        _stages(1, (1, 2, 3)),
    ),
    serial=True,
    outputs=("dh0", "dv"),
    constraints=(
        _tile_fits("BV", "V"),
        _register_budget("state_bwd_registers",
                         lambda c, k: 3 * next_pow2(k.K) * c["BV"] + 4 * c["BT"] * next_pow2(k.K)),
    ),
))

INTRA_BWD = register(KernelSpec(
    name="intra_bwd",
    direction="bwd",
    doc="output/WY/pairwise VJPs per chunk: dq, dk, dv, db, dw and dg (reverse cumsum)",
    params=(
        BT,
        Param("BC", (16, 32), 16, "sub-chunk rows of the pairwise VJP"),
        Param("BK", (16, 32, 64, 128), 32,
              "key-axis tile (BK = K: phase B reads dO, R, dR once more, not K / BK times)"),
        Param("BV", (16, 32, 64), 32, "value-axis tile"),
        Param("SOLVE_PRECISION", ("ieee", "tf32x3", "tf32"), "tf32x3",
              "precision of dT = -A^T dA A^T and of the dT products"),
        Param("PHASE_D", ("fused", "split"), "fused",
              "pairwise VJPs in the main program (partials through memory) or in a second "
              "launch, one program per (chunk, head, key tile), register-resident",
              algorithm=True),
        Param("BK_D", (0, 16, 32, 64), 0,
              "key tile of the pairwise launch when PHASE_D='split' (0: BK); its programs are "
              "(chunk, head, key tile), so a smaller tile means more programs and fewer registers"),
        Param("PHASE_B", ("fused", "split"), "fused",
              "the state products (dO S^T, dR S^T, R dS'^T) in the main program or in a first "
              "launch, one program per (chunk, head, key tile), with dA's share summed after",
              algorithm=True),
        _warps(),
        _stages(1, (1, 2)),
    ),
    outputs=("dq", "dk", "db", "dg", "dv", "dw"),
    parts=("pairwise", "state"),  # phase D when PHASE_D="split", phase B when PHASE_B="split"
    constraints=(
        Constraint("BC_divides_BT", "sub-chunks must tile the chunk",
                   lambda c, k: c["BC"] <= c["BT"] and c["BT"] % c["BC"] == 0),
        _tile_fits("BK", "K"),
        _tile_fits("BV", "V"),
        _tile_fits("BK_D", "K"),
        Constraint("BK_D_only_split", "BK_D sets the split pairwise launch's tile (0 otherwise)",
                   lambda c, k: c["BK_D"] == 0 or c["PHASE_D"] == "split"),
        _register_budget("intra_bwd_registers",
                         lambda c, k: 5 * c["BT"] * c["BT"] + 6 * c["BT"] * max(c["BK"], c["BV"])),
    ),
))

L2NORM_BWD = register(KernelSpec(
    name="l2norm_bwd",
    direction="bwd",
    doc="VJP of the row-wise L2 normalisation",
    params=L2NORM_FWD.params,
    outputs=("dq", "dk"),
))


__all__ = [
    "Constraint",
    "KernelConfig",
    "KernelSpec",
    "KEY_DTYPES",
    "MAX_HEAD_DIM",
    "Param",
    "ProblemKey",
    "Pruned",
    "SpaceReport",
    "all_specs",
    "dtype_name",
    "get_spec",
    "next_pow2",
    "register",
    "short_dtype_name",
    "version_tuple",
]


# ---------------------------------------------------------------------------------------------
# Decoding kernel
# ---------------------------------------------------------------------------------------------

RECURRENT_FWD = register(KernelSpec(
    name="recurrent_fwd",
    direction="fwd",
    doc="token recurrence with the [K, BV] state slice in fp32 registers (decode, short prompts)",
    params=(
        Param("BV", (8, 16, 32, 64, 128), 32,
              "value-axis tile of the state: programs = N*H*V/BV (more for small batches)"
              + _NARROWED),
        _warps(4, (1, 2, 4, 8)),
        _stages(2, (1, 2, 3)),
    ),
    outputs=("o", "ht"),
    constraints=(
        _tile_fits("BV", "V"),
        _register_budget("recurrent_fwd_registers",
                         lambda c, k: 2 * next_pow2(k.K) * c["BV"]),
    ),
    op="recurrent",
    serial=True,
))
