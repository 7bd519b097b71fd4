"""tcloss: fused kernels for the training losses of temporally consistent semantic video
segmentation (Liu et al., "Efficient Semantic Video Segmentation with Per-frame Inference",
ECCV 2020). See README.md for the API and the backend table."""
from . import _backends
from ._backends import available_backends
from ._backends import temporal_loss as _temporal_loss_glue
from .functional import flow_warp, occlusion_mask, temporal_loss

_temporal_loss_glue.register()

from . import metrics, nn, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["flow_warp", "occlusion_mask", "temporal_loss", "available_backends", "nn", "metrics", "reference"]
