"""The generated pages (docs/tuning.md, docs/cli.md) match what ``tuner.docs`` writes now."""
from __future__ import annotations

from gdn2_kernels.configs import all_specs
from tuner import docs


def test_generated_pages_are_current():
    stale = docs.stale_pages()
    assert not stale, f"regenerate with `python -m tuner.docs`: stale {stale}"
    assert docs.main(["--check"]) == 0


def test_tuning_page_lists_every_spec_and_rule():
    text = docs.tuning_markdown()
    for spec in all_specs():
        assert f"## `{spec.name}` ({spec.direction})" in text
        for p in spec.params:
            assert f"| `{p.name}` |" in text
        for rule in spec.arch_rules:
            assert rule.reason in text


def test_cli_page_lists_every_command():
    text = docs.cli_markdown()
    for cmd in ("verify", "bench", "profile", "info", "tune", "cache ls", "cache import"):
        assert f"`gdn2 {cmd}`" in text


def test_stale_pages_are_found_and_rewritten(tmp_path):
    (tmp_path / "tuning.md").write_text("old\n")
    assert docs.stale_pages(tmp_path) == ["tuning.md", "cli.md"]
    docs.write_pages(tmp_path)
    assert docs.stale_pages(tmp_path) == []
