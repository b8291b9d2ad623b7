"""The KernelSpec registry: kernels and specs match one to one, specs are well formed, and the
pipeline dispatch resolves one config per kernel with one chunk size."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import gdn2_kernels.kernels as kernels_pkg
from gdn2_kernels import dispatch
from gdn2_kernels.configs import (
    CHUNK_SIZES,
    KernelSpec,
    Param,
    ProblemKey,
    all_specs,
    get_spec,
    register,
)

_KERNEL_NAME = re.compile(r"^_(\w+)_kernel$")


def _is_triton_jit(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    return ast.unparse(target).split(".")[-1] == "jit"


def kernel_stems() -> dict[str, str]:
    """``{stem: file}`` of every ``@triton.jit`` ``_<stem>_kernel`` in gdn2_kernels/kernels/.

    Found by parsing the sources, so a new kernel module is picked up without being imported
    anywhere; ``@triton.jit`` helpers not named ``_*_kernel`` are not kernels.
    """
    found: dict[str, str] = {}
    for path in sorted(Path(kernels_pkg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            m = _KERNEL_NAME.match(getattr(node, "name", ""))
            if (m and isinstance(node, ast.FunctionDef)
                    and any(map(_is_triton_jit, node.decorator_list))):
                assert m.group(1) not in found, f"kernel {node.name} defined twice"
                found[m.group(1)] = path.name
    return found


def _part_owner() -> dict[str, str]:
    """``<spec>_<part>`` -> spec name, for the extra kernels a spec declares in ``parts``."""
    return {f"{s.name}_{part}": s.name for s in all_specs() for part in s.parts}


def test_kernels_and_specs_match_one_to_one():
    """Every kernel is a spec's own (``_<spec>_kernel``) or a declared part of one."""
    stems = kernel_stems()
    specs = {s.name for s in all_specs()}
    parts = _part_owner()
    unowned = set(stems) - specs - set(parts)
    assert not unowned, f"kernels without a KernelSpec: {sorted(unowned)}"
    assert not specs - set(stems), f"KernelSpecs without a kernel: {sorted(specs - set(stems))}"
    assert set(parts) <= set(stems), f"declared parts without a kernel: {set(parts) - set(stems)}"
    for part, owner in parts.items():
        assert stems[part] == stems[owner], f"{part} must live beside {owner} ({stems[owner]})"


def test_every_launcher_exists_with_the_kernel_stem():
    """STYLE 8: the launcher of ``_<stem>_kernel`` is ``<stem>`` in the same module (for a part,
    its spec's launcher)."""
    import importlib

    parts = _part_owner()
    for stem, file in kernel_stems().items():
        module = importlib.import_module(f"gdn2_kernels.kernels.{file.removesuffix('.py')}")
        launcher = parts.get(stem, stem)
        assert callable(getattr(module, launcher, None)), f"{file} has no launcher {launcher}()"


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_spec_is_well_formed(spec: KernelSpec):
    assert spec.direction in ("fwd", "bwd")
    names = [p.name for p in spec.params]
    assert len(names) == len(set(names))
    assert {"num_warps", "num_stages"} <= set(names)
    for p in spec.params:
        assert p.default in p.values and p.doc
    for c in spec.constraints:
        assert c.name and c.reason
    for out in spec.outputs:
        for dtype in ("float32", "bfloat16", "float16"):
            assert spec.tolerance(out, dtype) > 0
    if any(p.name == "BT" for p in spec.params):
        assert spec.param("BT").pipeline_wide and set(spec.param("BT").values) == set(CHUNK_SIZES)
    cfg = spec.default_config()
    assert set(cfg.constexprs()) | set(cfg.launch_options()) == set(names)


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_space_enumerates_and_prunes_with_reasons(spec: KernelSpec):
    report = spec.space(ProblemKey(128, 128, "bfloat16"))
    assert report.valid, f"{spec.name}: every config pruned at K=V=128"
    assert report.total == len(report.valid) + len(report.pruned)
    assert all(p.reason for p in report.pruned)
    for cfg in report.valid:
        assert spec.check(cfg, ProblemKey(128, 128, "bfloat16")) is None


def test_space_can_pin_parameters():
    spec = get_spec("intra_fwd")
    report = spec.space(ProblemKey(64, 64, "float32"), BT=32)
    assert report.valid and all(c["BT"] == 32 for c in report.valid)


def test_config_building_and_errors():
    spec = get_spec("intra_fwd")
    cfg = spec.config({"BT": 32, "BK": 16})
    assert cfg["BT"] == 32 and cfg["BK"] == 16 and cfg["BC"] == spec.param("BC").default
    assert cfg.replace(BV=64)["BV"] == 64
    with pytest.raises(KeyError, match="no parameter"):
        spec.config({"BQ": 1})
    with pytest.raises(KeyError, match="no parameter"):
        cfg.replace(BQ=1)
    with pytest.raises(KeyError, match="no parameter"):
        cfg["BQ"]
    assert spec.check(cfg.replace(BT=48), ProblemKey(64, 64, "float32")).rule == "value"


def test_registry_rejects_duplicates_and_names_the_available_specs():
    with pytest.raises(ValueError, match="already registered"):
        register(get_spec("state_fwd"))
    with pytest.raises(KeyError, match="available"):
        get_spec("no_such_kernel")
    bad = KernelSpec("bad_default", "fwd", "doc", (Param("BT", (16, 32), 64, "doc"),), ())
    with pytest.raises(ValueError, match="default"):
        register(bad)


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_default_pipeline_pins_one_chunk_size(chunk: int):
    pipe = dispatch.default_pipeline(chunk)
    assert {name for name, _ in pipe.configs} == {s.name for s in all_specs()}
    assert {c["BT"] for _, c in pipe.configs if "BT" in c.as_dict()} == {chunk}


def test_override_completes_partial_pipelines_and_rejects_mixed_chunk_sizes():
    intra = get_spec("intra_fwd").config({"BT": 32})
    with dispatch.override({"intra_fwd": intra}) as pipe:
        assert dispatch.resolve(ProblemKey(32, 32, "float32")) is pipe
        assert pipe["state_fwd"]["BT"] == 32
    with pytest.raises(ValueError, match="disagree on the chunk size"):
        with dispatch.override({"intra_fwd": intra,
                                "state_fwd": get_spec("state_fwd").config({"BT": 64})}):
            pass


def test_untuned_params_stay_at_default_in_the_space_but_are_valid_configs():
    """state_fwd's SCAN is not tuned (the tune's problem fills the GPU, where both scans are the
    same): the space keeps the default, while profiles and overrides may still set it."""
    spec = get_spec("state_fwd")
    assert not spec.param("SCAN").tuned
    key = ProblemKey(128, 128, "bfloat16")
    valid = spec.space(key).valid
    assert valid and {c["SCAN"] for c in valid} == {"serial"}
    assert spec.check(valid[0].replace(SCAN="segmented"), key) is None
