"""Context parallelism: one packed batch's token axis split across the ranks of a process group
(docs/context_parallel.md).

- :func:`chunk_gdn2_cp`: ``chunk_gdn2`` on each rank's slice, with the states chained across
  ranks through ``torch.distributed`` (autograd-capable).
- :class:`CPContext`, :func:`build_cp_context`: who holds which tokens (contiguous or zigzag
  layout); FLA's ``FLACPContext`` is accepted as is.
- :func:`chunk_gdn2_summary`: a span's end state from zero and its transition, the building block.
"""
from gdn2_kernels.cp.chunk import chunk_gdn2_cp
from gdn2_kernels.cp.context import LAYOUTS, CPContext, CPPart, build_cp_context
from gdn2_kernels.cp.summary import chunk_gdn2_summary

__all__ = ["LAYOUTS", "CPContext", "CPPart", "build_cp_context", "chunk_gdn2_cp",
           "chunk_gdn2_summary"]
