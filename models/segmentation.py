"""Segmentation networks of Liu et al. (ECCV 2020): students PSPNet18, MobileNetV2-PSP,
HRNet-w18-small (v2), teacher PSPNet101, and a tiny CPU smoke-test net.

Backbones come from timm (``features_only=True``, ``pretrained=False``; weights only from a
local file); the heads follow the paper's released code (``model/pspnet_18.py``):

* PSP head: pyramid pooling (bins 1, 2, 3, 6, each a 1x1 conv to C/4 channels), concat with
  the input, a 3x3 conv to ``head_channels`` (256 for ResNet18 / MobileNetV2, 512 for
  ResNet101) + BN + ReLU + Dropout2d(0.1), a 1x1 classifier.
* auxiliary head on layer3 (training only): 3x3 conv to 256 + BN + ReLU + Dropout + 1x1.
* HRNet head (as HRNet-Semantic-Segmentation): the four branches resized to one grid and
  concatenated (18+36+72+144 = 270 channels), 1x1 conv 270->270 + BN + ReLU, 1x1 classifier.

Forward contract (all models): input float RGB in 0..255, (B, 3, H, W); the model applies
the ImageNet mean/std itself (``input_norm=False`` to feed normalised tensors). Output dict:

* ``logits`` (B, K, ceil(H/8), ceil(W/8)) - class scores at 1/8 resolution;
* ``feat``   (B, D, ceil(H/8), ceil(W/8)) - the last feature map before the classifier
  (input of pair-wise and multi-frame distillation);
* ``aux``    (B, K, ceil(H/8), ceil(W/8)) - auxiliary-head logits, only in training mode and
  only for models with an auxiliary head (all but HRNet, which has none in the paper).

``upsample_logits`` resizes logits to the input size.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

__all__ = [
    "SegmentationModel", "PSPNet", "HRNetSeg", "TinySegNet", "PPM",
    "build_segmentation_model", "upsample_logits", "count_parameters", "parameter_table",
    "load_checkpoint", "load_weights", "load_backbone_weights", "mismatch_report", "model_key",
    "SEGMENTATION_MODELS", "PAPER_PARAMS_M",
]

# Table 4 of the paper (19 classes), in millions.
PAPER_PARAMS_M = {"pspnet18": 13.2, "mobilenetv2": 3.2, "hrnet_w18_small": 3.9}


def upsample_logits(logits, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize 1/8-resolution logits (or an output dict's ``logits``) to ``size`` = (H, W)."""
    if isinstance(logits, Mapping):
        logits = logits["logits"]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError("logits must be a (B, K, h, w) tensor or a dict holding one under 'logits'")
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode=mode, align_corners=False)


def _conv_bn_relu(cin, cout, k=3, stride=1, dilation=1):
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegmentationModel(nn.Module):
    """Base class: input normalisation, the output-dict contract, the input check."""

    has_aux = False

    def __init__(self, num_classes: int, input_norm: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.input_norm = bool(input_norm)
        # Non-persistent: checkpoints stay free of constants.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.float()
        if self.input_norm:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    @staticmethod
    def out_size(h: int, w: int):
        return math.ceil(h / 8), math.ceil(w / 8)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits upsampled to the input size (B, K, H, W)."""
        return upsample_logits(self(x)["logits"], x.shape[-2:])


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet): concat of x and pooled-conv-upsampled branches."""

    def __init__(self, in_channels: int, reduction: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, reduction, 1, bias=False),
                          nn.BatchNorm2d(reduction), nn.ReLU(inplace=True)) for b in bins])
        self.out_channels = in_channels + len(bins) * reduction

    def forward(self, x):
        size = x.shape[-2:]
        out = [x]
        for pool, conv, bn, act in self.stages:
            y = conv(pool(x))
            if self.training and y.shape[0] * y.shape[2] * y.shape[3] == 1:
                # Batch statistics of a single value are undefined (BN raises for batch 1 with
                # bin 1): normalise with the running statistics instead.
                y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            else:
                y = bn(y)
            out.append(F.interpolate(act(y), size=size, mode="bilinear", align_corners=False))
        return torch.cat(out, 1)


def _timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is in the 'train' extra
        raise ImportError("the segmentation backbones need timm (pip install timm)") from exc
    return timm


class PSPNet(SegmentationModel):
    """PSPNet on a dilated (output stride 8) timm backbone; see the module docstring.

    ``backbone``: any timm model supporting ``features_only`` + ``output_stride=8`` whose
    feature indices 3 and 4 are at stride 8 (ResNets, MobileNetV2, EfficientNets, ...).
    """

    has_aux = True

    def __init__(self, num_classes: int, backbone: str = "resnet18", head_channels: int = 256,
                 aux_channels: int = 256, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 aux: bool = True, input_norm: bool = True, backbone_kwargs: Optional[dict] = None):
        super().__init__(num_classes, input_norm)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone_name = backbone
        self.backbone = _timm().create_model(backbone, pretrained=False, features_only=True, output_stride=8,
                                             out_indices=(3, 4), **(backbone_kwargs or {}))
        c3, c4 = self.backbone.feature_info.channels()
        self.ppm = PPM(c4, c4 // len(bins), bins)
        self.head = _conv_bn_relu(self.ppm.out_channels, head_channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.feat_channels = head_channels
        self.aux_head = nn.Sequential(_conv_bn_relu(c3, aux_channels, 3), nn.Dropout2d(dropout),
                                      nn.Conv2d(aux_channels, num_classes, 1)) if aux else None

    def forward(self, x) -> Dict[str, torch.Tensor]:
        f3, f4 = self.backbone(self._prepare(x))
        feat = self.head(self.ppm(f4))
        out = {"logits": self.classifier(self.dropout(feat)), "feat": feat}
        if self.training and self.aux_head is not None:
            out["aux"] = self.aux_head(f3)
        return out


class HRNetSeg(SegmentationModel):
    """HRNetV2 segmentation (HRNet-w18-small-v2 by default) on timm's HRNet.

    timm's HRNet has no ``output_stride``; its four branches (strides 4, 8, 16, 32) are
    resized to a common grid of stride ``logits_stride`` (8 = the common contract; 4 = the
    original HRNet head) and concatenated. The input is zero-padded (after normalisation,
    i.e. with the mean colour) to a multiple of 32, because HRNet's fuse layers need exact
    2x size ratios, and the outputs are cropped back to ceil(H/stride) x ceil(W/stride).
    """

    has_aux = False

    def __init__(self, num_classes: int, backbone: str = "hrnet_w18_small_v2", logits_stride: int = 8,
                 input_norm: bool = True, backbone_kwargs: Optional[dict] = None):
        super().__init__(num_classes, input_norm)
        if logits_stride not in (4, 8):
            raise ValueError(f"logits_stride must be 4 or 8, got {logits_stride}")
        self.logits_stride = logits_stride
        self.backbone_name = backbone
        self.backbone = _timm().create_model(backbone, pretrained=False, features_only=True, feature_location="",
                                             out_indices=(1, 2, 3, 4), **(backbone_kwargs or {}))
        ch = sum(self.backbone.feature_info.channels())
        self.head = nn.Sequential(nn.Conv2d(ch, ch, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(ch, num_classes, 1)
        self.feat_channels = ch

    def forward(self, x) -> Dict[str, torch.Tensor]:
        x = self._prepare(x)
        h, w = x.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.backbone(x)
        s = self.logits_stride
        grid = ((h + ph) // s, (w + pw) // s)
        feats = [f if tuple(f.shape[-2:]) == grid else
                 F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in feats]
        oh, ow = math.ceil(h / s), math.ceil(w / s)
        feat = self.head(torch.cat(feats, 1)[..., :oh, :ow])
        return {"logits": self.classifier(feat), "feat": feat}

    def out_size(self, h: int, w: int):  # type: ignore[override]
        return math.ceil(h / self.logits_stride), math.ceil(w / self.logits_stride)


class TinySegNet(SegmentationModel):
    """A ~0.1 M-parameter conv net with the same contract, for CPU smoke training.

    Stride-8 encoder (three stride-2 conv stages), two dilated context convs, a small
    pyramid pooling, a 3x3 head; auxiliary head on the stride-8 encoder output.
    """

    has_aux = True

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.1, aux: bool = True,
                 input_norm: bool = True):
        super().__init__(num_classes, input_norm)
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        w = width
        self.encoder = nn.Sequential(_conv_bn_relu(3, w, 3, 2), _conv_bn_relu(w, 2 * w, 3, 2),
                                     _conv_bn_relu(2 * w, 4 * w, 3, 2), _conv_bn_relu(4 * w, 4 * w, 3))
        self.context = nn.Sequential(_conv_bn_relu(4 * w, 4 * w, 3, dilation=2),
                                     _conv_bn_relu(4 * w, 4 * w, 3, dilation=4))
        self.ppm = PPM(4 * w, w, bins=(1, 2, 4))
        self.head = _conv_bn_relu(self.ppm.out_channels, 4 * w, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(4 * w, num_classes, 1)
        self.feat_channels = 4 * w
        self.aux_head = nn.Sequential(_conv_bn_relu(4 * w, 2 * w, 3), nn.Dropout2d(dropout),
                                      nn.Conv2d(2 * w, num_classes, 1)) if aux else None

    def forward(self, x) -> Dict[str, torch.Tensor]:
        e = self.encoder(self._prepare(x))
        feat = self.head(self.ppm(self.context(e)))
        out = {"logits": self.classifier(self.dropout(feat)), "feat": feat}
        if self.training and self.aux_head is not None:
            out["aux"] = self.aux_head(e)
        return out


# --------------------------------------------------------------------------- weights


def load_checkpoint(path) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict from a local file (raw, or under 'state_dict' / 'model' / 'model_state_dict').

    A 'module.' prefix (DataParallel / DDP) is stripped. Loads with ``weights_only=True``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path} (weights are only read from local files)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {path} as a PyTorch state dict ({type(exc).__name__}: {exc}); "
                         "save it with torch.save(model.state_dict(), path)") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    out = OrderedDict()
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def mismatch_report(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                    ignore_unexpected: bool = False) -> list:
    """How a state dict ``given`` differs from ``expected`` (a model's): one line each for the missing
    keys, the unexpected keys (unless ``ignore_unexpected``) and the shape mismatches; [] if it fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [] if ignore_unexpected else [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... (+{len(items) - 5} more)" if len(items) > 5 else ""
            lines.append(f"{len(items)} {title}: {', '.join(items[:5])}{more}")
    return lines


def load_weights(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load full-model weights from a local file; a mismatched checkpoint raises ValueError.

    With ``strict=False`` missing/unexpected keys are tolerated but shape mismatches are not.
    """
    sd = load_checkpoint(path)
    expected = model.state_dict()
    problems = mismatch_report(expected, sd, ignore_unexpected=not strict)
    if not strict:
        problems = [p for p in problems if "shape mismatches" in p]
    if problems:
        raise ValueError(f"checkpoint {os.fspath(path)} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=strict)
    return model


def load_backbone_weights(model: nn.Module, path) -> nn.Module:
    """Load backbone weights (e.g. an ImageNet classifier checkpoint saved locally).

    Keys may carry a 'backbone.' prefix (a full segmentation checkpoint) or none (a plain
    timm / torchvision classifier: ResNet key names are shared); keys the backbone does not
    have (classifier 'fc.*', ...) are ignored. Every backbone tensor must be present with
    the right shape, else ValueError.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(model).__name__} has no timm backbone to load weights into")
    sd = load_checkpoint(path)
    if any(k.startswith("backbone.") for k in sd):
        sd = OrderedDict((k[len("backbone."):], v) for k, v in sd.items() if k.startswith("backbone."))
    expected = backbone.state_dict()
    problems = mismatch_report(expected, sd, ignore_unexpected=True)
    if problems:
        name = getattr(model, "backbone_name", "")
        raise ValueError(f"checkpoint {os.fspath(path)} does not match the backbone {name} of "
                         f"{type(model).__name__}: " + "; ".join(problems))
    backbone.load_state_dict(OrderedDict((k, sd[k]) for k in expected), strict=True)
    return model


# --------------------------------------------------------------------------- builder

SEGMENTATION_MODELS = {
    "pspnet18": lambda num_classes, **o: PSPNet(num_classes, backbone="resnet18", head_channels=256, **o),
    "mobilenetv2": lambda num_classes, **o: PSPNet(num_classes, backbone="mobilenetv2_100", head_channels=256, **o),
    "hrnet_w18_small": lambda num_classes, **o: HRNetSeg(num_classes, backbone="hrnet_w18_small_v2", **o),
    "pspnet101": lambda num_classes, **o: PSPNet(num_classes, backbone="resnet101", head_channels=512, **o),
    "tiny": lambda num_classes, **o: TinySegNet(num_classes, **o),
}
_ALIASES = {
    "psp18": "pspnet18", "pspnet_r18": "pspnet18", "resnet18": "pspnet18",
    "mobilenetv2_psp": "mobilenetv2", "psp_mobilenetv2": "mobilenetv2", "mbv2": "mobilenetv2",
    "hrnet": "hrnet_w18_small", "hrnet18": "hrnet_w18_small", "hrnet_w18_small_v2": "hrnet_w18_small",
    "hrnet_w18": "hrnet_w18_small", "psp101": "pspnet101", "pspnet_r101": "pspnet101", "teacher": "pspnet101",
}


def model_key(name) -> Optional[str]:
    """The key in ``SEGMENTATION_MODELS`` of a model name or alias (any case), or None if unknown."""
    if not isinstance(name, str):
        return None
    key = _ALIASES.get(name.lower(), name.lower())
    return key if key in SEGMENTATION_MODELS else None


def build_segmentation_model(name: str, num_classes: int, *, weights=None, pretrained_backbone=None,
                             **opts) -> SegmentationModel:
    """Build a segmentation network by name.

    Names: ``pspnet18``, ``mobilenetv2`` (PSP head), ``hrnet_w18_small`` (v2), ``pspnet101``
    (teacher), ``tiny``; aliases such as ``psp101`` / ``hrnet18`` are accepted.
    ``weights``: local path of a full-model state dict; ``pretrained_backbone``: local path
    of backbone (ImageNet) weights. Other options go to the model class (``dropout``,
    ``aux``, ``input_norm``, ``head_channels``, ``logits_stride`` for HRNet, ``width`` for tiny).
    Backbones are always created with random init (``pretrained=False``): nothing is downloaded.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = model_key(name)
    if key is None:
        raise ValueError(f"unknown segmentation model name {name!r}; choose from {sorted(SEGMENTATION_MODELS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        model = SEGMENTATION_MODELS[key](num_classes, **opts)
    except TypeError as exc:
        raise TypeError(f"bad option for segmentation model {key!r}: {exc}") from exc
    if pretrained_backbone is not None:
        load_backbone_weights(model, pretrained_backbone)
    if weights is not None:
        load_weights(model, weights)
    return model


def count_parameters(model: nn.Module, include_aux: bool = False) -> int:
    """Number of parameters; the training-only auxiliary head is left out unless ``include_aux``."""
    return sum(p.numel() for n, p in model.named_parameters() if include_aux or not n.startswith("aux_head."))


def parameter_table(num_classes: int = 19, names: Optional[Sequence[str]] = None):
    """Rows ``{name, params_m, params_with_aux_m, paper_m, diff_pct}`` for the named models."""
    rows = []
    for name in names or ("pspnet18", "mobilenetv2", "hrnet_w18_small", "pspnet101", "tiny"):
        model = build_segmentation_model(name, num_classes)
        n, n_aux = count_parameters(model), count_parameters(model, include_aux=True)
        paper = PAPER_PARAMS_M.get(model_key(name))
        rows.append({"name": name, "params_m": n / 1e6, "params_with_aux_m": n_aux / 1e6, "paper_m": paper,
                     "diff_pct": None if paper is None else 100.0 * (n / 1e6 - paper) / paper})
        del model
    return rows


def format_parameter_table(rows) -> str:
    lines = [f"{'model':<16} {'params (M)':>10} {'+aux (M)':>9} {'paper (M)':>9} {'diff':>7}"]
    for r in rows:
        paper = "-" if r["paper_m"] is None else f"{r['paper_m']:.1f}"
        diff = "-" if r["diff_pct"] is None else f"{r['diff_pct']:+.1f}%"
        lines.append(f"{r['name']:<16} {r['params_m']:>10.2f} {r['params_with_aux_m']:>9.2f} {paper:>9} {diff:>7}")
    return "\n".join(lines)
