"""tcloss.flow: .flo I/O, resize_flow, the flow direction convention on real data, DIS, RAFT weights."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tcloss
from tcloss import flow as tflow

CHAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flyingchairs_examples"
needs_chairs = pytest.mark.skipif(not CHAIRS.is_dir(), reason=f"shared FlyingChairs sample not found at {CHAIRS}")
try:
    import cv2  # noqa: F401
    HAS_CV2 = True
except ImportError:
    HAS_CV2 = False
needs_cv2 = pytest.mark.skipif(not HAS_CV2, reason="OpenCV (cv2) is not installed (pip install tcloss[flow])")


def _read_ppm(path) -> torch.Tensor:
    """Binary PPM (P6, maxval 255) -> float32 (1, 3, H, W) RGB 0..255, without OpenCV."""
    raw = Path(path).read_bytes()
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+(\d+)\s", raw)
    assert m and int(m.group(3)) == 255, path
    w, h = int(m.group(1)), int(m.group(2))
    img = np.frombuffer(raw, np.uint8, count=w * h * 3, offset=m.end()).reshape(h, w, 3)
    return torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()


def _chairs():
    """(stem, img0, img1, gt flow (1, 2, H, W)) for every FlyingChairs pair."""
    out = []
    for gt_path in sorted(CHAIRS.glob("*-gt.flo")):
        stem = gt_path.name[:-len("-gt.flo")]
        gt = torch.from_numpy(tflow.read_flo(gt_path)).permute(2, 0, 1)[None]
        out.append((stem, _read_ppm(CHAIRS / f"{stem}-img0.ppm"), _read_ppm(CHAIRS / f"{stem}-img1.ppm"), gt))
    assert out, f"no *-gt.flo files in {CHAIRS}"
    return out


def _in_frame(flow: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: x + u, y + v lands inside the frame."""
    _, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=flow.dtype), torch.arange(w, dtype=flow.dtype), indexing="ij")
    px, py = xs + flow[:, 0], ys + flow[:, 1]
    return (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)


def _textured(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bicubic",
                        align_corners=False)
    return img.clamp(0, 1) * 255


# --------------------------------------------------------------------------- import


def test_import_tcloss_does_not_import_cv2_or_torchvision():
    code = ("import sys, tcloss; assert 'tcloss.flow' not in sys.modules; import tcloss.flow; "
            "f = tcloss.flow.read_flo; bad = [m for m in ('cv2', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    assert "flow" in tcloss.__all__ and tcloss.flow is tflow


def test_missing_optional_dependencies_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install tcloss[flow]")):
        tflow.DISFlow()
    with pytest.raises(ImportError, match=re.escape("pip install tcloss[flow]")):
        tflow.dis_flow(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    # every level: an already imported torchvision.models would otherwise satisfy the import
    for name in ("torchvision", "torchvision.models", "torchvision.models.optical_flow"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=re.escape("pip install tcloss[flow]")):
        tflow.RAFTFlow("small", weights="/nonexistent/raft.pth")


# --------------------------------------------------------------------------- .flo


def test_flo_round_trip(tmp_path):
    flow = torch.randn(2, 7, 11)
    tflow.write_flo(tmp_path / "t.flo", flow)
    raw = (tmp_path / "t.flo").read_bytes()
    assert len(raw) == 12 + 8 * 7 * 11
    assert np.frombuffer(raw[:4], "<f4")[0] == np.float32(202021.25) == np.float32(tflow.FLO_MAGIC)
    assert tuple(np.frombuffer(raw[4:12], "<i4")) == (11, 7)  # width, height
    back = tflow.read_flo(tmp_path / "t.flo")
    assert back.shape == (7, 11, 2) and back.dtype == np.float32
    assert np.array_equal(back, flow.permute(1, 2, 0).numpy())
    assert np.array_equal(np.frombuffer(raw[12:], "<f4").reshape(7, 11, 2), back)  # u, v interleaved, row-major
    # (1, 2, H, W) tensors and (H, W, 2) float64 arrays are accepted too
    tflow.write_flo(tmp_path / "b.flo", flow[None])
    assert (tmp_path / "b.flo").read_bytes() == raw
    arr = np.random.default_rng(0).normal(size=(3, 5, 2))
    tflow.write_flo(str(tmp_path / "a.flo"), arr)
    assert np.array_equal(tflow.read_flo(str(tmp_path / "a.flo")), arr.astype(np.float32))


def test_flo_bad_files(tmp_path):
    good = tmp_path / "good.flo"
    tflow.write_flo(good, torch.randn(2, 4, 6))
    raw = good.read_bytes()
    cases = {
        "zeros.flo": (b"\x00" * 16, "magic"),
        "empty.flo": (b"", "magic"),
        "png.flo": (b"\x89PNG\r\n\x1a\n" + raw[8:], "magic"),
        "bigendian.flo": (np.array([tflow.FLO_MAGIC], ">f4").tobytes() + raw[4:], "magic"),
        "noheader.flo": (raw[:6], "header"),
        "negative.flo": (raw[:4] + np.array([-6, 4], "<i4").tobytes() + raw[12:], "width/height"),
        "zerowidth.flo": (raw[:4] + np.array([0, 4], "<i4").tobytes() + raw[12:], "width/height"),
        "huge.flo": (raw[:4] + np.array([1 << 30, 1 << 30], "<i4").tobytes() + raw[12:], "width/height"),
        "short.flo": (raw[:-4], "truncated"),
        "long.flo": (raw + b"\x00" * 8, "trailing"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=msg):
            tflow.read_flo(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.flo"):
        tflow.read_flo(tmp_path / "missing.flo")
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        tflow.write_flo(tmp_path / "x.flo", torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        tflow.write_flo(tmp_path / "x.flo", np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="rows and columns"):
        tflow.write_flo(tmp_path / "x.flo", np.zeros((0, 5, 2)))


@needs_chairs
def test_read_shared_flo():
    f = tflow.read_flo(CHAIRS / "0000000-gt.flo")
    assert f.shape == (384, 512, 2) and f.dtype == np.float32 and np.isfinite(f).all()


# --------------------------------------------------------------------------- resize_flow


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(20, 30), (5, 7), (10, 15), (31, 9)])
def test_resize_constant_flow(size, align_corners):
    h, w = 10, 15
    f = torch.empty(2, 3, 2, h, w)  # (B, T, 2, H, W): leading dims are kept
    f[:, :, 0], f[:, :, 1] = 1.5, -2.0
    r = tflow.resize_flow(f, size, align_corners=align_corners)
    nh, nw = size
    assert r.shape == (2, 3, 2, nh, nw) and r.dtype == f.dtype
    sx, sy = ((nw - 1) / (w - 1), (nh - 1) / (h - 1)) if align_corners else (nw / w, nh / h)
    if (nh, nw) == (h, w):
        assert r is f
    # a uniform motion stays uniform, with its vectors in the new pixels
    assert torch.allclose(r[:, :, 0], torch.full_like(r[:, :, 0], 1.5 * sx), atol=1e-5)
    assert torch.allclose(r[:, :, 1], torch.full_like(r[:, :, 1], -2.0 * sy), atol=1e-5)


def test_resize_flow_vector_scaling_and_modes():
    f = torch.ones(1, 2, 10, 20)
    f[:, 1] = 2
    r = tflow.resize_flow(f, (5, 60))  # u * 60/20 = 3, v * 5/10 = 1
    assert r.shape == (1, 2, 5, 60)
    assert torch.allclose(r[:, 0], torch.full((1, 5, 60), 3.0)) and torch.allclose(r[:, 1], torch.ones(1, 5, 60))
    for mode in ("nearest", "nearest-exact", "bicubic"):
        r = tflow.resize_flow(f, (5, 60), mode)
        assert torch.allclose(r[:, 0], torch.full((1, 5, 60), 3.0), atol=1e-5), mode
    r = tflow.resize_flow(f[0], (20, 40))  # (2, H, W)
    assert r.shape == (2, 20, 40) and torch.allclose(r[0], torch.full((20, 40), 2.0))
    assert tflow.resize_flow(torch.ones(1, 2, 4, 4, dtype=torch.int64), (8, 8)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, H, W\)"):
        tflow.resize_flow(torch.zeros(1, 3, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="size"):
        tflow.resize_flow(f, (0, 8))
    with pytest.raises(ValueError, match="mode"):
        tflow.resize_flow(f, (8, 8), "area")
    with pytest.raises(TypeError, match="tensor"):
        tflow.resize_flow(np.zeros((2, 4, 4)), (8, 8))


@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_flow_follows_the_pixel_grid(align_corners):
    # A zoom about a point c: u(x) = a (x - cx), v(y) = b (y - cy). Resizing the frames maps pixel
    # coordinates by x' = (x + 0.5) W'/W - 0.5 (align_corners=False) or x' = x (W'-1)/(W-1) (True);
    # the resized flow must be the same zoom about the mapped point, in the new pixels. Bilinear
    # sampling of a linear field is exact away from the border (where it is clamped).
    h, w, nh, nw = 24, 32, 60, 40
    a, b, cx, cy = 0.05, -0.08, 13.0, 9.0
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    f = torch.stack([a * (xs - cx), b * (ys - cy)])[None]
    r = tflow.resize_flow(f, (nh, nw), align_corners=align_corners)
    if align_corners:
        mx = lambda x: x * (nw - 1) / (w - 1)  # noqa: E731
        my = lambda y: y * (nh - 1) / (h - 1)  # noqa: E731
    else:
        mx = lambda x: (x + 0.5) * nw / w - 0.5  # noqa: E731
        my = lambda y: (y + 0.5) * nh / h - 0.5  # noqa: E731
    ys2, xs2 = torch.meshgrid(torch.arange(nh, dtype=torch.float64), torch.arange(nw, dtype=torch.float64),
                              indexing="ij")
    # the point x of the old frame moves to x + u(x); in the new frame, mx(x) moves to mx(x + u(x))
    expect_u = mx(torch.tensor(cx)) + (xs2 - mx(torch.tensor(cx))) * (1 + a) - xs2
    expect_v = my(torch.tensor(cy)) + (ys2 - my(torch.tensor(cy))) * (1 + b) - ys2
    inner = (slice(3, -3), slice(3, -3))
    assert torch.allclose(r[0, 0][inner], expect_u[inner], atol=1e-9)
    assert torch.allclose(r[0, 1][inner], expect_v[inner], atol=1e-9)


# --------------------------------------------------------------------------- convention on real data


def _away_from_motion_edges(flow: torch.Tensor, r: int = 4) -> torch.Tensor:
    """(B, H, W) bool: no motion boundary (flow jumps > 0.5 px between neighbours) within r pixels.
    Occlusions (and disocclusions) lie along motion boundaries: this keeps them out."""
    jump = F.max_pool2d(flow, 3, 1, 1) + F.max_pool2d(-flow, 3, 1, 1)
    edge = (jump > 0.5).any(1, keepdim=True).float()
    return F.max_pool2d(edge, 2 * r + 1, 1, r)[:, 0] == 0


@needs_chairs
def test_convention_gt_flow_warps_frame_tk_onto_frame_t():
    """FlyingChairs GT flow (img0 -> img1) is tcloss's flow t -> t+k: warping img1 (frame t+k) with it
    through tcloss.flow_warp reproduces img0 (frame t), and temporal_loss measures exactly that."""
    tot = np.zeros(3)
    for stem, img0, img1, gt in _chairs():
        assert gt.shape == (1, 2) + img0.shape[-2:]
        keep = (_in_frame(gt) & _away_from_motion_edges(gt))[0]
        assert keep.float().mean() > 0.5, stem
        warped = tcloss.flow_warp(img1, gt)
        err = (warped - img0).abs().mean(1)[0][keep].mean()  # photometric error, 0..255
        err_none = (img1 - img0).abs().mean(1)[0][keep].mean()  # no warp
        err_wrong = (tcloss.flow_warp(img1, -gt) - img0).abs().mean(1)[0][keep].mean()  # the other direction
        # measured: err / err_none 0.09 .. 0.52, err / err_wrong 0.08 .. 0.40 (textured pair 8, slow pair 6)
        assert err < 0.6 * err_none and err < 0.45 * err_wrong, (stem, err.item(), err_none.item(), err_wrong.item())
        tot += [err.item(), err_none.item(), err_wrong.item()]
        # temporal_loss reads flow in the same direction: with V = 1 (mask_power=0) on the images
        # themselves it is sum_c (img0 - flow_warp(img1, gt))^2 per pixel
        x0, x1 = img0 / 255, img1 / 255
        tl = tcloss.temporal_loss(x0, x1, gt, x0, x1, on="logit", mask_power=0, reduction="none")[0]
        ref = (x0 - tcloss.flow_warp(x1, gt)).pow(2).sum(1)[0]
        assert torch.allclose(tl, ref, rtol=1e-3, atol=1e-5)  # any backend (float32 kernels: ~1e-4 relative)
        tl_none, tl_wrong = (tcloss.temporal_loss(x0, x1, f, x0, x1, on="logit", mask_power=0, reduction="none")[0]
                             for f in (torch.zeros_like(gt), -gt))
        # measured: 0.08 .. 0.53 of no warp, 0.06 .. 0.37 of the reversed flow
        assert tl[keep].mean() < 0.65 * tl_none[keep].mean() and tl[keep].mean() < 0.45 * tl_wrong[keep].mean(), stem
    n = len(_chairs())
    print(f"mean |I0 - I1 warped| over {n} pairs (0..255, in-frame, off motion edges): "
          f"GT flow {tot[0] / n:.2f}, no warp {tot[1] / n:.2f}, reversed flow {tot[2] / n:.2f}")
    assert tot[0] < 0.35 * tot[1]


@needs_chairs
@needs_cv2
def test_dis_epe_on_flyingchairs():
    est = {p: tflow.DISFlow(p) for p in tflow.DIS_PRESETS}
    epe = {p: [] for p in est}
    epe_zero = []
    for stem, img0, img1, gt in _chairs():
        for p, e in est.items():
            flow = e(img0, img1)
            assert flow.shape == gt.shape and flow.dtype == torch.float32
            epe[p].append((flow - gt).norm(dim=1).mean().item())
        epe_zero.append(gt.norm(dim=1).mean().item())
    mean = {p: float(np.mean(v)) for p, v in epe.items()}
    zero = float(np.mean(epe_zero))
    print(f"FlyingChairs ({len(epe_zero)} pairs) average EPE: zero flow {zero:.3f} px, "
          + ", ".join(f"DIS {p} {v:.3f} px" for p, v in mean.items()))
    assert mean["medium"] < 5.0 and mean["medium"] < 0.5 * zero, (mean, zero)
    for p in ("ultrafast", "fast"):
        assert mean[p] < 0.75 * zero, (p, mean, zero)


@needs_chairs
@needs_cv2
def test_dis_numpy_images_match_tensors():
    _, img0, img1, gt = _chairs()[3]  # pair 0: DIS misses the large motion at the border (EPE > zero flow)
    a = img0[0].permute(1, 2, 0).numpy().astype(np.uint8)  # (H, W, 3) RGB uint8
    b = img1[0].permute(1, 2, 0).numpy().astype(np.uint8)
    f_np = tflow.dis_flow(a, b, preset="fast")
    assert isinstance(f_np, np.ndarray) and f_np.shape == a.shape[:2] + (2,) and f_np.dtype == np.float32
    f_t = tflow.dis_flow(img0, img1, preset="fast")
    assert np.allclose(f_t[0].permute(1, 2, 0).numpy(), f_np)
    gray = tflow.DISFlow("fast")(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY))
    assert np.abs(gray - f_np).mean() < 0.05  # the same luma up to rounding
    f_med = tflow.dis_flow(a, b)  # preset medium
    assert np.linalg.norm(f_med - gt[0].permute(1, 2, 0).numpy(), axis=-1).mean() < 0.75 * gt.norm(dim=1).mean()


@needs_cv2
@pytest.mark.parametrize("preset", tflow.DIS_PRESETS)
def test_dis_direction_on_known_shift(preset):
    # b is a moved by (dx, dy): a(y, x) = b(y + dy, x + dx), so the flow a -> b is (dx, dy)
    big = _textured(96, 112)
    dx, dy = 3, -2
    a = big[..., 16:80, 16:96]
    b = big[..., 16 - dy:80 - dy, 16 - dx:96 - dx]
    flow = tflow.DISFlow(preset)(a, b)
    assert flow.shape == (1, 2, 64, 80)
    med = flow[0, :, 8:-8, 8:-8].flatten(1).median(1).values
    assert torch.allclose(med, torch.tensor([dx, dy], dtype=torch.float32), atol=0.5), med
    warped = tcloss.flow_warp(b, flow)
    assert (warped - a)[..., 8:-8, 8:-8].abs().mean() < 0.3 * (b - a)[..., 8:-8, 8:-8].abs().mean()


@needs_cv2
def test_dis_errors_and_pickle():
    import pickle

    with pytest.raises(ValueError, match="preset"):
        tflow.DISFlow("slow")
    est = tflow.DISFlow("ultrafast")
    with pytest.raises(ValueError, match="img_a"):
        est(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        est(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(TypeError, match="numpy"):
        est(np.zeros((8, 8), np.uint8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="RGB"):
        est(np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 4), np.uint8))
    a = _textured(32, 40)
    f1 = est(a, a)
    est2 = pickle.loads(pickle.dumps(est))
    assert torch.equal(est2(a, a), f1) and f1.abs().max() < 0.5


# --------------------------------------------------------------------------- RAFT


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tcloss.flow tried to download")

    import urllib.request

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("variant", tflow.RAFT_VARIANTS)
def test_raft_missing_weights_clear_error_no_download(tmp_path, monkeypatch, variant):
    pytest.importorskip("torchvision", reason="torchvision is not installed (pip install tcloss[flow])")
    _no_network(monkeypatch)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty torchvision cache
    expected = tflow.raft_cache_path(variant)
    assert expected.startswith(str(tmp_path / "hub" / "checkpoints")) and expected.endswith(".pth")
    with pytest.raises(FileNotFoundError) as info:
        tflow.RAFTFlow(variant)
    msg = str(info.value)
    assert expected in msg and "weights=" in msg and "never downloads" in msg and "https://" in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        tflow.RAFTFlow(variant, weights=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="variant"):
        tflow.RAFTFlow("tiny")
    with pytest.raises(TypeError, match="weights"):
        tflow.RAFTFlow(variant, weights=3)
    assert not (tmp_path / "hub").exists()  # nothing was written into the cache


def test_raft_reads_torchvision_cache_without_network(tmp_path, monkeypatch):
    tvof = pytest.importorskip("torchvision.models.optical_flow", reason="torchvision is not installed")
    _no_network(monkeypatch)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    path = Path(tflow.raft_cache_path("small"))
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(tvof.raft_small(weights=None).state_dict(), path)  # stands in for torchvision's file
    est = tflow.RAFTFlow("small", num_flow_updates=1)
    flow = est(_textured(40, 56, 1), _textured(40, 56, 2))  # padded to 128 x 128 inside
    assert flow.shape == (1, 2, 40, 56) and flow.dtype == torch.float32 and torch.isfinite(flow).all()
    with pytest.raises(ValueError, match="does not match torchvision raft_large"):
        tflow.RAFTFlow("large", weights=path)
    with pytest.raises(ValueError, match="Raft_Large_Weights"):
        tflow.RAFTFlow("large", weights=tvof.Raft_Small_Weights.DEFAULT)
