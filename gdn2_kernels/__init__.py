"""gdn2_kernels: tuned, verified Triton kernels for Gated DeltaNet-2 (docs/math.md).

Importing the package sets no environment variable and patches nothing. Without a CUDA device
the same kernels run on CPU tensors through Triton's interpreter, launch by launch, slowly, for
testing (``_interpreter``).
"""
from gdn2_kernels import _env
from gdn2_kernels.ops import (  # noqa: E402
    chunk_gdn2,
    fused_recurrent_gdn2,
    fused_recurrent_gdn2_fwd,
)
from gdn2_kernels._gate_check import InvalidGateError  # noqa: E402
from gdn2_kernels._gate_check import check as check_gates  # noqa: E402
from gdn2_kernels.layer import GatedDeltaNet2, GDN2Cache  # noqa: E402
from gdn2_kernels.exported import load_exported  # noqa: E402
from gdn2_kernels.reference import (  # noqa: E402
    naive_chunk_gdn2,
    naive_recurrent_gdn2,
)

__version__ = "0.1.0"

if _env.fla_integration_requested():  # GDN2_FLA=1: route flash-linear-attention's GDN-2 ops here
    from gdn2_kernels.integrations import fla as _fla_integration

    _fla_integration.enable()

__all__ = ["GDN2Cache", "GatedDeltaNet2", "InvalidGateError", "check_gates", "chunk_gdn2",
           "fused_recurrent_gdn2", "fused_recurrent_gdn2_fwd", "load_exported", "naive_chunk_gdn2", "naive_recurrent_gdn2", "__version__"]
