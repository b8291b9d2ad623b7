"""Integrations with other libraries; each is opt-in (nothing here runs on ``import gdn2_kernels``
unless its switch is set)."""
