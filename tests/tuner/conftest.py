"""Tuner tests: a private cache folder, no config file, fresh dispatch/config-store caches."""
from __future__ import annotations

import os
import sys

import pytest

# Spawned workers import the fake trial functions and helpers by module name.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    from gdn2_kernels import config_files, dispatch

    monkeypatch.setenv("GDN2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GDN2_CONFIG_FILE", raising=False)
    monkeypatch.setattr(config_files, "profiles_dir", lambda: tmp_path / "profiles")
    config_files.forget()
    dispatch.clear_cache()
    yield tmp_path
    config_files.forget()
    dispatch.clear_cache()
