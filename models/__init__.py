"""Segmentation networks and optical-flow estimators used by ``train.py``.

* ``build_segmentation_model(name, num_classes, **opts)``: ``pspnet18``, ``mobilenetv2``,
  ``hrnet_w18_small``, ``pspnet101`` (teacher), ``tiny``. Input float RGB 0..255 (B,3,H,W);
  output dict ``logits`` (1/8 res), ``feat``, ``aux`` (training only). See ``segmentation``.
* ``build_flow_estimator(name, **options)``: ``dis``, ``raft_small``, ``raft_large``, ``gt``,
  ``flo``; a callable ``(img_a, img_b) -> flow (B,2,H,W)`` in pixels. See ``flow``.
* ``python -m models`` prints parameter counts next to the paper's Table 4.
"""

from .segmentation import (PAPER_PARAMS_M, SEGMENTATION_MODELS, HRNetSeg, PSPNet, SegmentationModel, TinySegNet,
                           build_segmentation_model, count_parameters, format_parameter_table, load_backbone_weights,
                           load_checkpoint, load_weights, mismatch_report, model_key, parameter_table,
                           upsample_logits)
from .flow import (FLOW_ESTIMATORS, DISFlow, FloFileFlow, FlowEstimator, GTFlow, RAFTFlow, build_flow_estimator,
                   read_flo, resize_flow, warp, write_flo)

__all__ = [
    "PAPER_PARAMS_M", "SEGMENTATION_MODELS", "HRNetSeg", "PSPNet", "SegmentationModel", "TinySegNet",
    "build_segmentation_model", "count_parameters", "format_parameter_table", "load_backbone_weights",
    "load_checkpoint", "load_weights", "mismatch_report", "model_key", "parameter_table", "upsample_logits",
    "FLOW_ESTIMATORS", "DISFlow", "FloFileFlow", "FlowEstimator", "GTFlow", "RAFTFlow", "build_flow_estimator",
    "read_flo", "resize_flow", "warp", "write_flo",
]
