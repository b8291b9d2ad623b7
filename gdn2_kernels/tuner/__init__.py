"""gdn2 tuner: config sweeps with per-candidate verification, timing, the cache, GPU identity."""
