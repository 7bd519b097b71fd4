"""models/flow.py: flow estimators, .flo I/O, the warping convention."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_flow_estimator, read_flo, resize_flow, write_flo
import videodata

from conftest import SHARED_DATA, grid_warp

CHAIRS = SHARED_DATA / "flyingchairs_examples"


def _read_rgb(path):
    return videodata.read_image(path)[None]


@pytest.mark.skipif(not CHAIRS.is_dir(), reason=f"shared FlyingChairs sample not found at {CHAIRS}")
def test_dis_epe_on_flyingchairs():
    est = build_flow_estimator("dis")  # preset medium
    epe, epe_zero = [], []
    for gt_path in sorted(CHAIRS.glob("*-gt.flo")):
        stem = gt_path.name[:-len("-gt.flo")]
        a, b = _read_rgb(CHAIRS / f"{stem}-img0.ppm"), _read_rgb(CHAIRS / f"{stem}-img1.ppm")
        gt = torch.from_numpy(read_flo(gt_path)).permute(2, 0, 1)[None]
        flow = est(a, b)
        assert flow.shape == gt.shape and flow.dtype == torch.float32
        epe.append((flow - gt).norm(dim=1).mean().item())
        epe_zero.append(gt.norm(dim=1).mean().item())
    epe, epe_zero = float(np.mean(epe)), float(np.mean(epe_zero))
    assert epe < 5.0 and epe < 0.5 * epe_zero, (epe, epe_zero)  # ~3.7 vs ~10.5


def _textured(h=64, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bicubic",
                        align_corners=False)
    return (img.clamp(0, 1) * 255)


@pytest.mark.parametrize("size", [None, (48, 60)])
def test_dis_convention_on_known_shift(size):
    # b is a shifted by (dx, dy): a(y, x) = b(y + dy, x + dx) -> flow (dx, dy) on the interior
    big = _textured(96, 112)
    dx, dy = 3, -2
    a = big[..., 16:80, 16:96]
    b = big[..., 16 - dy:80 - dy, 16 - dx:96 - dx]
    flow = build_flow_estimator("dis", preset="medium", size=size)(a, b)
    assert flow.shape == (1, 2, 64, 80)
    med = flow[0, :, 8:-8, 8:-8].flatten(1).median(1).values
    assert torch.allclose(med, torch.tensor([dx, dy], dtype=torch.float32), atol=0.5), med


def test_flo_round_trip_and_errors(tmp_path):
    flow = torch.randn(2, 7, 11)
    write_flo(tmp_path / "f.flo", flow)
    raw = (tmp_path / "f.flo").read_bytes()
    assert np.frombuffer(raw[:4], np.float32)[0] == np.float32(202021.25)
    assert tuple(np.frombuffer(raw[4:12], np.int32)) == (11, 7)  # width, height
    back = read_flo(tmp_path / "f.flo")
    assert back.shape == (7, 11, 2)
    assert np.array_equal(back, flow.permute(1, 2, 0).numpy())
    # the same through the 'flo' estimator (relative to its root), and resized with rescaling
    est = build_flow_estimator("flo", root=tmp_path)
    out = est(torch.zeros(1, 3, 7, 11), torch.zeros(1, 3, 7, 11), paths=["f.flo"])
    assert torch.equal(out[0], flow)
    out2 = est(torch.zeros(1, 3, 14, 22), torch.zeros(1, 3, 14, 22), paths=["f.flo"])
    assert torch.allclose(out2.mean((2, 3)), 2 * flow.mean((1, 2))[None], atol=1e-4)
    (tmp_path / "bad.flo").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="magic"):
        read_flo(tmp_path / "bad.flo")
    (tmp_path / "short.flo").write_bytes(raw[:40])
    with pytest.raises(ValueError, match="truncated"):
        read_flo(tmp_path / "short.flo")
    with pytest.raises(FileNotFoundError, match="missing.flo"):
        read_flo(tmp_path / "missing.flo")
    with pytest.raises(ValueError, match="paths"):
        est(torch.zeros(1, 3, 7, 11), torch.zeros(1, 3, 7, 11))


@pytest.mark.skipif(not CHAIRS.is_dir(), reason=f"shared FlyingChairs sample not found at {CHAIRS}")
def test_read_shared_flo():
    f = read_flo(CHAIRS / "0000000-gt.flo")
    assert f.shape == (384, 512, 2) and np.isfinite(f).all()


def test_resize_flow_scales_vectors():
    f = torch.ones(1, 2, 10, 20)
    f[:, 1] = 2
    r = resize_flow(f, (5, 60))
    assert r.shape == (1, 2, 5, 60)
    assert torch.allclose(r[:, 0], torch.full((1, 5, 60), 3.0)) and torch.allclose(r[:, 1], torch.ones(1, 5, 60))


@pytest.mark.parametrize("variant", ["small"])
def test_raft_from_local_weights(tmp_path, variant):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    est = build_flow_estimator("raft_small", weights=path, num_flow_updates=2)
    a, b = _textured(60, 68, 1), _textured(60, 68, 2)  # not multiples of 8: padded inside
    flow = est(a, b)
    assert flow.shape == (1, 2, 60, 68) and flow.dtype == torch.float32 and torch.isfinite(flow).all()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_flow_estimator("raft_small", weights=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="weights"):
        build_flow_estimator("raft_small")
    with pytest.raises(ValueError, match="does not match"):
        build_flow_estimator("raft_large", weights=path)  # a small checkpoint


def test_gt_flow_warp_reproduces_previous_frame():
    from videodata import SyntheticClip

    clip = SyntheticClip(7, length=4, size=(64, 80), difficulty=0.0)  # no noise, flicker or blur
    est = build_flow_estimator("gt")
    for k in (1, 3):
        gt, occ = clip.flow_and_occlusion(0, k)
        a, b = clip.frames[0:1], clip.frames[k:k + 1]
        flow = est(a, b, gt_flow=gt[None])
        warped = grid_warp(b, flow)
        err = (warped - a).abs().mean(1)[0]
        vis = ~occ
        # bilinear sampling mixes two layers right at object edges: judge the layer interiors
        lay = clip.layers[0].float()[None, None]
        interior = vis & (F.max_pool2d(lay, 3, 1, 1) == -F.max_pool2d(-lay, 3, 1, 1))[0, 0]
        zero_err = (b - a).abs().mean(1)[0][vis].mean()
        assert vis.float().mean() > 0.7
        assert err[vis].median() < 0.5
        assert err[interior].mean() < 1.0, err[interior].mean()
        assert err[interior].mean() < 0.25 * zero_err, (err[interior].mean(), zero_err)
    with pytest.raises(ValueError, match="gt_flow"):
        est(a, b)


def test_estimator_argument_errors():
    with pytest.raises(ValueError, match="unknown flow estimator"):
        build_flow_estimator("farneback")
    with pytest.raises(ValueError, match="preset"):
        build_flow_estimator("dis", preset="slow")
    with pytest.raises(ValueError, match="img_a"):
        build_flow_estimator("dis")(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        build_flow_estimator("dis")(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
