"""tcloss: fused kernels for the training losses of temporally consistent semantic video
segmentation (Liu et al., "Efficient Semantic Video Segmentation with Per-frame Inference",
ECCV 2020). See README.md for the API and the backend table."""
from . import _backends
from ._backends import available_backends, backend_status
from .functional import flow_warp, occlusion_mask, temporal_loss
from .functional import pairwise_similarity_loss, pixelwise_kd
from .functional import convlstm_cell

_backends.register_ops()
_backends.warn_if_build_incomplete()

from . import metrics, nn, reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["flow_warp", "occlusion_mask", "temporal_loss", "pairwise_similarity_loss", "pixelwise_kd", "convlstm_cell",
           "available_backends", "backend_status", "nn", "metrics", "reference", "flow"]


def __getattr__(name):
    # tcloss.flow (optional extra tcloss[flow]) is imported on first use; it imports cv2 / torchvision
    # only inside its estimators.
    if name == "flow":
        import importlib

        return importlib.import_module(".flow", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
