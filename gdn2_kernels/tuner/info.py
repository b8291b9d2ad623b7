"""``gdn2 info``: the GPU (NVML), software versions, registered kernels and their spaces, and
where this machine's configs come from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gdn2_kernels import _device, config_files, dispatch, gpu, provenance
from gdn2_kernels.configs import ProblemKey, all_specs
from gdn2_kernels.tuner.strategies import STRATEGIES
from gdn2_kernels.tuner.tune import GPU_PROBLEM, workload_of


@dataclass
class KernelInfo:
    name: str
    direction: str
    workload: str
    doc: str
    params: dict[str, dict[str, Any]]  # name -> {values, default, doc}
    space_total: int
    space_valid: int
    pruned_by_rule: dict[str, int]
    resolved: dict[str, Any] | None = None  # the config dispatch resolves for the key
    launched: dict[str, Any] | None = None  # ... as it launches at the asked shape (--shape)


@dataclass
class InfoReport:
    gpu: gpu.GpuReport
    device: str
    arch: str
    interpreter: bool
    software: dict[str, Any]
    key: dict[str, Any]
    resolved_source: str
    sources: list[dispatch.SourceInfo]
    kernels: list[KernelInfo] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    shape: dict[str, int] | None = None  # B, T, H of --shape (None: not asked)
    launch_changes: list[str] = field(default_factory=list)  # what launch time changes there


def collect(key: ProblemKey | None = None, shape: tuple[int, int] | None = None,
            heads: int = GPU_PROBLEM.H) -> InfoReport:
    """Everything ``gdn2 info`` shows, for ``key`` (default: the paper's K = V = 128, bf16);
    with ``shape`` ``(B, T)`` also the configs as they launch there with ``heads`` heads
    (``dispatch.launch_time``)."""
    key = key or ProblemKey(GPU_PROBLEM.K, GPU_PROBLEM.V, GPU_PROBLEM.dtype)
    arch = _device.arch()
    try:
        pipe = dispatch.resolve(key)
        resolved_source = pipe.source
    except config_files.CacheError as exc:  # a $GDN2_CONFIG_FILE that is not there
        pipe, resolved_source = None, f"error: {exc}"
    launched = None
    if pipe is not None and shape is not None:
        launched = dispatch.launch_time(pipe, shape[0], heads, shape[1], key.V,
                                        _device.default_device())
    kernels = []
    for spec in all_specs():
        rep = spec.space(key)
        by_rule: dict[str, int] = {}
        for pr in rep.pruned:
            by_rule[pr.rule] = by_rule.get(pr.rule, 0) + 1
        resolved = pipe.as_dict().get(spec.name) if pipe is not None else None
        kernels.append(KernelInfo(
            spec.name, spec.direction, workload_of(spec), spec.doc,
            {p.name: {"values": list(p.values), "default": p.default, "doc": p.doc}
             for p in spec.params},
            rep.total, len(rep.valid), by_rule,
            resolved.as_dict() if resolved is not None else None,
            launched.pipeline[spec.name].as_dict() if launched is not None else None))
    return InfoReport(gpu.report(), _device.gpu_name(), arch, _device.interpreter_active(),
                      provenance.current_software(), key.as_dict(), resolved_source,
                      dispatch.describe_sources(), kernels, sorted(STRATEGIES),
                      None if shape is None else {"B": shape[0], "T": shape[1], "H": heads},
                      list(launched.changes) if launched is not None else [])


__all__ = ["InfoReport", "KernelInfo", "collect"]
