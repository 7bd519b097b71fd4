"""tcloss.metrics: mIoU / pixel accuracy / temporal consistency accumulators."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_metrics():
    # Load by path: the module must stand alone (torch + numpy only).
    spec = importlib.util.spec_from_file_location("_tcloss_metrics_standalone", ROOT / "tcloss" / "metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


M = _load_metrics()


def _labels(seed=0, b=2, h=24, w=32, c=4):
    g = torch.Generator().manual_seed(seed)
    # blocky label maps so that shifts keep most pixels in their class
    small = torch.randint(0, c, (b, h // 4, w // 4), generator=g)
    return small.repeat_interleave(4, 1).repeat_interleave(4, 2)


def test_metrics_module_imports_only_torch_numpy():
    src = (ROOT / "tcloss" / "metrics.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imports <= {"torch", "numpy", "math", "numbers", "typing"}, imports  # + the standard library


def test_perfect_predictor():
    t = _labels()
    m = M.SegmentationMetrics(4)
    m.update(t, t)
    r = m.compute()
    assert r["miou"] == pytest.approx(100.0)
    assert r["pixel_acc"] == pytest.approx(100.0)
    assert r["iou"] == pytest.approx([100.0] * 4)


def test_constant_predictor_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = torch.zeros_like(target)
    m = M.SegmentationMetrics(3)
    m.update(pred, target)
    r = m.compute()
    # 7 valid pixels: class 0 -> I=2, U=7; classes 1 and 2 -> IoU 0.
    assert r["iou"][0] == pytest.approx(200 / 7)
    assert r["iou"][1:] == [0.0, 0.0]
    assert r["miou"] == pytest.approx(200 / 21)
    assert r["pixel_acc"] == pytest.approx(200 / 7)


def test_absent_class_excluded_and_logits_input():
    target = torch.tensor([[0, 0, 1, 1]])
    logits = torch.zeros(1, 5, 1, 4)
    logits[0, 0, 0, :2] = 1
    logits[0, 1, 0, 2:] = 1
    m = M.SegmentationMetrics(5)
    m.update(logits, target)
    r = m.compute()
    assert r["miou"] == pytest.approx(100.0)
    assert all(v != v for v in r["iou"][2:])  # NaN for absent classes


def test_merge_equals_joint_and_all_reduce_noop():
    a, b = _labels(1), _labels(2)
    p1, p2 = _labels(3), _labels(4)
    joint = M.SegmentationMetrics(4)
    joint.update(p1, a)
    joint.update(p2, b)
    m1, m2 = M.SegmentationMetrics(4), M.SegmentationMetrics(4)
    m1.update(p1, a)
    m2.update(p2, b)
    m1.merge(m2).all_reduce()  # not initialised: no-op
    assert torch.equal(m1.confusion, joint.confusion)
    assert m1.compute()["miou"] == pytest.approx(joint.compute()["miou"])
    m1.reset()
    assert int(m1.confusion.sum()) == 0


def test_bad_inputs():
    m = M.SegmentationMetrics(3)
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="pred"):
        m.update(torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="target"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        M.SegmentationMetrics(0)
    with pytest.raises(ValueError, match="num_classes"):
        M.SegmentationMetrics(3).merge(M.SegmentationMetrics(4))


def _shift(labels, dx, dy):
    return torch.roll(labels, shifts=(dy, dx), dims=(1, 2))


def test_tc_perfect_with_integer_motion():
    p0 = torch.randint(0, 4, (2, 24, 32), generator=torch.Generator().manual_seed(5))
    dx, dy = 3, -2
    p1 = _shift(p0, dx, dy)  # content moves by (dx, dy): p1[y+dy, x+dx] = p0[y, x]
    flow = torch.zeros(2, 2, *p0.shape[1:])
    flow[:, 0], flow[:, 1] = dx, dy
    tc = M.TemporalConsistency(4)
    tc.update(p0, p1, flow)
    r = tc.compute()
    assert r["tc"] == pytest.approx(100.0)
    # the wrapped-around border strips are out of frame and excluded
    h, w = p0.shape[1:]
    assert r["num_pixels"] == 2 * (h - 2) * (w - 3)
    # without the exclusion the border-clamped pixels disagree
    tc2 = M.TemporalConsistency(4, exclude_out_of_frame=False)
    tc2.update(p0, p1, flow)
    assert tc2.compute()["num_pixels"] == p0.numel()
    assert tc2.compute()["tc"] < 100.0


def test_tc_constant_flicker_and_occlusion():
    h, w = 16, 16
    zero = torch.zeros(1, 2, h, w)
    const = torch.ones(1, h, w, dtype=torch.long)
    tc = M.TemporalConsistency(3)
    tc.update(const, const, zero)
    assert tc.compute()["tc"] == pytest.approx(100.0)
    # flicker: the right half switches class between frames -> by hand
    a = torch.zeros(1, h, w, dtype=torch.long)
    b = a.clone()
    b[..., w // 2:] = 2
    tc = M.TemporalConsistency(3)
    tc.update(a, b, zero)
    r = tc.compute()
    # class 0: I = 128, U = 256; class 2: I = 0, U = 128 -> mean over present = 25%
    assert r["tc"] == pytest.approx(25.0)
    assert r["agreement"] == pytest.approx(50.0)
    tc_all = M.TemporalConsistency(3, average="all")
    tc_all.update(a, b, zero)
    assert tc_all.compute()["tc"] == pytest.approx(50.0 / 3)
    # the flickering half flagged as occluded is not compared
    occ = torch.zeros(1, h, w, dtype=torch.bool)
    occ[..., w // 2:] = True
    tc = M.TemporalConsistency(3)
    tc.update(a, b, zero, occlusion=occ)
    assert tc.compute()["tc"] == pytest.approx(100.0)


def test_tc_nearest_warp_rounds_half_up_and_no_new_classes():
    labels = torch.tensor([[[0, 5, 0, 5]]])
    flow = torch.zeros(1, 2, 1, 4)
    flow[:, 0] = 0.5  # bilinear would invent class 2.5; nearest picks the right neighbour
    warped, inside = M.nearest_warp_labels(labels, flow)
    assert warped.tolist() == [[[5, 0, 5, 5]]]
    assert inside.tolist() == [[[True, True, True, False]]]


def test_tc_bad_inputs():
    tc = M.TemporalConsistency(3)
    p = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="flow"):
        tc.update(p, p, torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="occlusion"):
        tc.update(p, p, torch.zeros(1, 2, 4, 4), occlusion=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="average"):
        M.TemporalConsistency(3, average="mean")


# ---------------------------------------------------------------- issue 12: reliability ----------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_negative_ignore_index_never_wraps(dtype):
    """ignore_index=-1 with uint8 labels: -1 compared in uint8 is 255, so a label 255 was silently
    ignored. Labels are compared in int64: 255 is an out-of-range class (an error), and -1
    (where the dtype has it) is ignored."""
    m = M.SegmentationMetrics(4, ignore_index=-1)
    lab = torch.tensor([[[0, 1], [2, 3]]], dtype=dtype)
    if dtype == torch.uint8:
        bad = lab.clone()
        bad[0, 1, 1] = 255
        with pytest.raises(ValueError, match="target holds class id 255"):
            m.update(lab, bad)
        with pytest.raises(ValueError, match="pred holds class ids outside"):
            m.update(bad, lab)
        tc = M.TemporalConsistency(4, ignore_index=-1)
        with pytest.raises(ValueError, match="pred_t holds class id 255"):
            tc.update(bad, lab, torch.zeros(1, 2, 2, 2))
    else:
        tgt = lab.clone()
        tgt[0, 1, 1] = -1
        m.update(lab, tgt)
        assert int(m.confusion.sum()) == 3
    assert int(M.SegmentationMetrics(4, ignore_index=255).confusion.sum()) == 0


def test_empty_batch_is_a_no_op():
    """An empty batch adds nothing (TemporalConsistency raised a raw reshape error)."""
    tc = M.TemporalConsistency(3)
    empty = torch.zeros(0, 4, 5, dtype=torch.long)
    tc.update(empty, empty, torch.zeros(0, 2, 4, 5))
    tc.update(empty, empty, torch.zeros(0, 2, 4, 5), occlusion=torch.zeros(0, 4, 5, dtype=torch.bool))
    assert int(tc.confusion.sum()) == 0 and tc.compute()["num_pixels"] == 0
    p = torch.zeros(1, 4, 5, dtype=torch.long)
    tc.update(p, p, torch.zeros(1, 2, 4, 5))
    assert tc.compute()["num_pixels"] == 20
    seg = M.SegmentationMetrics(3)
    seg.update(empty, empty)
    seg.update(torch.zeros(0, 3, 4, 5), empty)  # logits
    assert int(seg.confusion.sum()) == 0
    warped, inside = M.nearest_warp_labels(empty, torch.zeros(0, 2, 4, 5))
    assert warped.shape == (0, 4, 5) and inside.shape == (0, 4, 5)


def test_integral_options_and_bool_flags():
    """num_classes / ignore_index: any integral number (numpy too), never a bool or a float; the
    TC flags must be real bools."""
    m = M.SegmentationMetrics(np.int64(5), ignore_index=np.int16(-1))
    assert m.num_classes == 5 and type(m.num_classes) is int and m.ignore_index == -1
    assert M.TemporalConsistency(np.uint8(3)).num_classes == 3
    for bad, exc in ((True, TypeError), (5.0, TypeError), ("5", TypeError), (np.int64(0), ValueError)):
        with pytest.raises(exc, match="num_classes must be a positive int"):
            M.SegmentationMetrics(bad)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        M.SegmentationMetrics(3, ignore_index=255.0)
    with pytest.raises(TypeError, match="exclude_occluded must be a bool"):
        M.TemporalConsistency(3, exclude_occluded="no")
    with pytest.raises(TypeError, match="exclude_out_of_frame must be a bool"):
        M.TemporalConsistency(3, exclude_out_of_frame=0)
    assert M.TemporalConsistency(3, exclude_occluded=np.bool_(False)).exclude_occluded is False
    # average: a wrong type is a TypeError, a wrong string a ValueError (both name it)
    for bad in (None, 1, True, ["all"], b"all"):
        with pytest.raises(TypeError, match="average must be 'present' or 'all' \\(a string\\)"):
            M.TemporalConsistency(3, average=bad)
    with pytest.raises(ValueError, match="average must be 'present' or 'all', got 'mean'"):
        M.TemporalConsistency(3, average="mean")
    assert M.TemporalConsistency(3, average=np.str_("all")).average == "all"
