"""Video segmentation data sets for training and evaluating with temporal losses.

Data sets (all ``torch.utils.data.Dataset``):

* ``SyntheticVideo`` - procedural clips, no files, exact flow / occlusion (the default);
  ``SyntheticClip`` generates one clip.
* ``CamVid``   - SegNet layout, 11 classes.
* ``Cityscapes`` - ``leftImg8bit_sequence`` snippets + ``gtFine`` labelIds -> 19 train ids.

``build_dataset(name, **options)`` builds one by name (``synthetic``, ``camvid``, ``cityscapes``).

Item keys, ``mode="triplet"`` (training; one item per labelled frame; the paper's random
sampled policy: a frame before and after at random distances <= ``max_distance``, clamped
at the clip ends; one random scale / crop / flip shared by the whole triplet):

==============  ===========================  ==============================================
key             shape, dtype                 meaning
==============  ===========================  ==============================================
``frames``      (3, 3, H, W) float32 0..255  [previous, labelled, next] RGB frames
``label``       (H, W) int64                 label of the middle frame, 255 = ignore
``offsets``     (3,) int64                   frame offsets from the labelled frame, [-a, 0, b]
``flow``        (2, 2, H, W) float32         flow labelled->previous and labelled->next, in
                                             pixels (ch 0 = dx, 1 = dy; warping frame k with
                                             it reproduces the labelled frame). Synthetic:
                                             exact; others: only with ``flow_estimator``
``occlusion``   (2, H, W) bool               True = pixel of the labelled frame not visible
                                             in that neighbour (synthetic only)
``index``       () int64                     item index
``name``        str                          "<sequence>/<frame index>"
==============  ===========================  ==============================================

``mode="clip"`` (evaluation; consecutive frames, windows of ``clip_length``):
``frames`` (T, 3, H, W), ``labels`` (T, H, W) (255 on unlabelled frames), ``labelled``
(T,) bool, ``flow`` (T-1, 2, H, W) t -> t+1 and ``occlusion`` (T-1, H, W) where available,
``index``, ``name``.

Flow follows the augmentation: resized with the frames (vectors scaled), cropped, x
negated on flips; padded pixels get label 255, flow 0 and occlusion True.
"""

from .base import VideoSegDataset, read_image, read_label
from .camvid import CAMVID_CLASSES, CamVid
from .cityscapes import CITYSCAPES_CLASSES, LABEL_ID_TO_TRAIN_ID, Cityscapes
from .synthetic import SyntheticClip, SyntheticVideo, generate_clip
from .transforms import TripletAugment, resize_flow, resize_sample, sample_triplet

__all__ = ["VideoSegDataset", "SyntheticVideo", "SyntheticClip", "generate_clip", "CamVid", "Cityscapes",
           "CAMVID_CLASSES", "CITYSCAPES_CLASSES", "LABEL_ID_TO_TRAIN_ID", "TripletAugment", "sample_triplet",
           "resize_sample", "resize_flow", "read_image", "read_label", "build_dataset", "DATASETS"]

DATASETS = {"synthetic": SyntheticVideo, "camvid": CamVid, "cityscapes": Cityscapes}


def build_dataset(name: str = "synthetic", **options):
    """Build a data set by name: ``synthetic`` (no files), ``camvid`` / ``cityscapes`` (``root=``)."""
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name.lower()](**options)
