"""The generated pages (docs/tuning.md, docs/cli.md) match what ``gdn2_kernels.docs`` writes now."""
from __future__ import annotations

from gdn2_kernels.configs import all_specs
from gdn2_kernels import docs


def test_generated_pages_are_current():
    stale = docs.stale_pages()
    assert not stale, f"regenerate with `python -m gdn2_kernels.docs`: stale {stale}"
    assert docs.main(["--check"]) == 0


def test_tuning_page_lists_every_spec_and_the_sources():
    from gdn2_kernels import dispatch

    text = docs.tuning_markdown()
    for spec in all_specs():
        assert f"## `{spec.name}` ({spec.direction})" in text
        for p in spec.params:
            assert f"| `{p.name}` |" in text
    assert dispatch.precedence_table() in text
    assert all(f"`{s.name}`" in text for s in dispatch.SOURCES)


def test_cli_page_lists_every_command():
    text = docs.cli_markdown()
    for cmd in ("verify", "bench", "stages", "info", "tune", "cache ls", "cache import"):
        assert f"`gdn2 {cmd}`" in text


def test_stale_pages_are_found_and_rewritten(tmp_path):
    (tmp_path / "tuning.md").write_text("old\n")
    assert docs.stale_pages(tmp_path) == ["tuning.md", "cli.md"]
    docs.write_pages(tmp_path)
    assert docs.stale_pages(tmp_path) == []


def test_ci_runs_the_readmes_two_commands():
    """.ci/run runs the README's main job (in a fresh venv) and its test command, verbatim."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    fenced = re.findall(r"```bash\n(.*?)\n```", (root / "README.md").read_text(), re.S)
    main_job, test_command = fenced[:2]
    assert main_job.endswith("gdn2 tune") and "[test]" not in main_job
    assert test_command.endswith('python -m pytest -q -m "not gpu"')
    ci = (root / ".ci" / "run").read_text()
    assert f"main_job={shlex.quote(main_job)}\n" in ci
    assert f"test_command={shlex.quote(test_command)}\n" in ci
    assert 'python -m venv "$fresh/venv"' in ci and 'eval "$main_job"' in ci
    assert ci.index('eval "$main_job"') < ci.index('eval "$test_command"')
