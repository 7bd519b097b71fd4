"""models/: segmentation networks (shapes, parameter counts, local weight loading)."""
import pytest
import torch

import models
from models import build_segmentation_model, count_parameters, upsample_logits

H, W = 57, 75  # odd on purpose (not multiples of 8 or 32)
OUT = (8, 10)  # ceil(H / 8), ceil(W / 8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name,feat_ch,has_aux", [
    ("pspnet18", 256, True), ("mobilenetv2", 256, True), ("hrnet_w18_small", 270, False), ("tiny", 64, True)])
def test_output_contract_odd_size(name, feat_ch, has_aux):
    model = build_segmentation_model(name, 5)
    x = torch.rand(2, 3, H, W) * 255
    model.train()
    out = model(x)
    assert out["logits"].shape == (2, 5, *OUT)
    assert out["feat"].shape == (2, feat_ch, *OUT)
    assert ("aux" in out) == has_aux
    if has_aux:
        assert out["aux"].shape == (2, 5, *OUT)
    if name == "tiny":  # one backward is enough (first calls of big nets are slow on 2 cores)
        out["logits"].mean().backward()
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert set(out) == {"logits", "feat"}
    assert upsample_logits(out, (H, W)).shape == (1, 5, H, W)
    assert model.predict(x[:1]).shape == (1, 5, H, W)


def test_batch_one_training_step():
    # pyramid pooling bin 1 on a batch of 1 must not trip BatchNorm
    model = build_segmentation_model("tiny", 3).train()
    out = model(torch.rand(1, 3, 40, 40) * 255)
    out["logits"].sum().backward()


# Table 4 of the paper vs ours; see models/README.md for why they differ.
TOLERANCE = 0.10


@pytest.mark.parametrize("name", ["pspnet18", "mobilenetv2", "hrnet_w18_small"])
def test_parameter_counts_near_paper(name):
    n = count_parameters(build_segmentation_model(name, 19)) / 1e6
    paper = models.PAPER_PARAMS_M[name]
    assert abs(n - paper) / paper < TOLERANCE, (name, n, paper)


def test_teacher_pspnet101():
    model = build_segmentation_model("pspnet101", 19).eval()
    n = count_parameters(model) / 1e6
    assert 60 < n < 70  # ResNet101 (42.5 M) + PSP head with 512 channels
    with torch.no_grad():
        out = model(torch.rand(1, 3, 65, 65) * 255)
    assert out["logits"].shape == (1, 19, 9, 9)
    assert out["feat"].shape == (1, 512, 9, 9)


def test_tiny_is_small_and_cli_prints(capsys):
    assert count_parameters(build_segmentation_model("tiny", 19)) < 500_000
    from models.__main__ import main

    main(["tiny", "hrnet_w18_small"])
    text = capsys.readouterr().out
    assert "tiny" in text and "hrnet_w18_small" in text and "3.9" in text


def test_weights_round_trip(tmp_path):
    a = build_segmentation_model("tiny", 4).eval()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in a.state_dict().items()}}, path)
    b = build_segmentation_model("tiny", 4, weights=path).eval()
    x = torch.rand(1, 3, 33, 47) * 255
    with torch.no_grad():
        assert torch.equal(a(x)["logits"], b(x)["logits"])


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_segmentation_model("tiny", 4, weights=tmp_path / "nope.pth")
    path = tmp_path / "tiny4.pth"
    torch.save(build_segmentation_model("tiny", 4).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_segmentation_model("tiny", 7, weights=path)  # other class count
    with pytest.raises(ValueError, match="unexpected keys"):
        models.load_weights(build_segmentation_model("tiny", 4, aux=False), path)  # no aux_head.* in model
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="state dict"):
        models.load_weights(build_segmentation_model("tiny", 4), junk)


def test_backbone_weights_from_classifier_checkpoint(tmp_path):
    import timm

    clf = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10)
    path = tmp_path / "mbv2_imagenet.pth"
    torch.save(clf.state_dict(), path)  # includes classifier / conv_head keys, which are ignored
    seg = build_segmentation_model("mobilenetv2", 19, pretrained_backbone=path)
    w_clf = clf.state_dict()["conv_stem.weight"]
    assert torch.equal(seg.backbone.state_dict()["conv_stem.weight"], w_clf)
    wrong = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ValueError, match="backbone"):
        build_segmentation_model("mobilenetv2", 19, pretrained_backbone=wrong)


def test_builder_errors():
    with pytest.raises(ValueError, match="unknown segmentation model"):
        build_segmentation_model("segformer", 19)
    with pytest.raises(ValueError, match="num_classes"):
        build_segmentation_model("tiny", 0)
    with pytest.raises(TypeError, match="tiny"):
        build_segmentation_model("tiny", 3, no_such_option=1)
    with pytest.raises(ValueError, match="shape"):
        build_segmentation_model("tiny", 3)(torch.rand(1, 4, 8, 8))
