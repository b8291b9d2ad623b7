"""The fake trial functions of :mod:`fake_trials`, behind an import that takes
``GDN2_TEST_IMPORT_SECONDS`` (a worker's start-up on a loaded machine, made long on purpose)."""
from __future__ import annotations

import os
import time

time.sleep(float(os.environ.get("GDN2_TEST_IMPORT_SECONDS", "0")))

from fake_trials import by_config  # noqa: E402,F401
