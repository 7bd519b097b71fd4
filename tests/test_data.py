"""videodata/: synthetic video, CamVid, Cityscapes, triplet sampling and joint augmentation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videodata import (CamVid, Cityscapes, SyntheticClip, SyntheticVideo, TripletAugment,
                       build_dataset, sample_triplet)

from conftest import SHARED_DATA, grid_warp

CAMVID = SHARED_DATA / "camvid_0016E5"


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_per_seed():
    a = SyntheticClip(3, length=6, size=(48, 64), num_classes=5)
    b = SyntheticClip(3, length=6, size=(48, 64), num_classes=5)
    c = SyntheticClip(4, length=6, size=(48, 64), num_classes=5)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.flow(0, 5), b.flow(0, 5))
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.shape == (6, 3, 48, 64) and a.frames.dtype == torch.float32
    assert 0 <= a.frames.min() and a.frames.max() <= 255
    assert a.labels.shape == (6, 48, 64) and a.labels.dtype == torch.int64
    assert int(a.labels.max()) < 5 and len(a.labels.unique()) >= 3


def test_synthetic_ground_truth_consistency():
    clip = SyntheticClip(1, length=5, size=(64, 64))
    fw, occ_fw = clip.forward_flow()
    bw, occ_bw = clip.backward_flow()
    assert fw.shape == (4, 2, 64, 64) and occ_fw.shape == (4, 64, 64) and occ_fw.dtype == torch.bool
    assert torch.isfinite(fw).all() and fw.abs().max() > 0.3  # things move
    assert 0.0 < occ_fw.float().mean() < 0.5
    # forward-backward check: visible points come back to where they started
    back = grid_warp(bw[:1], fw[:1])[0]
    vis = ~occ_fw[0]
    lay = clip.layers[0].float()[None, None]
    interior = vis & (F.max_pool2d(lay, 3, 1, 1) == -F.max_pool2d(-lay, 3, 1, 1))[0, 0]
    assert (fw[0] + back).norm(dim=0)[interior].mean() < 0.05
    # labels move with the flow: nearest-warped label of t+1 equals label of t on visible pixels
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    sx = (xs + fw[0, 0]).round().long().clamp(0, 63)
    sy = (ys + fw[0, 1]).round().long().clamp(0, 63)
    agree = (clip.labels[1][sy, sx] == clip.labels[0])[vis].float().mean()
    assert agree > 0.97


def test_synthetic_difficulty_adds_nuisances():
    clean = SyntheticClip(2, length=3, size=(48, 48), difficulty=0.0)
    hard = SyntheticClip(2, length=3, size=(48, 48), difficulty=1.0)
    assert torch.equal(clean.labels, hard.labels)  # same scene, only the appearance changes
    assert (clean.frames - hard.frames).abs().mean() > 3.0
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticClip(0, num_classes=1)
    with pytest.raises(ValueError, match="size"):
        SyntheticClip(0, size=(4, 4))


def test_synthetic_dataset_items():
    ds = SyntheticVideo(num_clips=2, length=8, size=(48, 64), num_classes=4, max_distance=3, sample_seed=0)
    assert len(ds) == 16
    item = ds[9]
    assert item["frames"].shape == (3, 3, 48, 64) and item["frames"].dtype == torch.float32
    assert item["label"].shape == (48, 64) and item["label"].dtype == torch.int64
    assert item["flow"].shape == (2, 2, 48, 64) and item["occlusion"].shape == (2, 48, 64)
    off = item["offsets"].tolist()
    assert off[1] == 0 and -3 <= off[0] <= 0 <= off[2] <= 3
    again = ds[9]  # sample_seed fixes the random choices per item
    assert torch.equal(item["frames"], again["frames"]) and item["offsets"].tolist() == again["offsets"].tolist()
    # a second data set with the same seed yields the same data
    ds2 = SyntheticVideo(num_clips=2, length=8, size=(48, 64), num_classes=4, max_distance=3, sample_seed=0)
    assert torch.equal(ds2[9]["frames"], item["frames"])
    clips = SyntheticVideo(num_clips=1, length=8, size=(48, 64), mode="clip", clip_length=5)
    assert len(clips) == 2
    c = clips[0]
    assert c["frames"].shape == (5, 3, 48, 64) and c["labels"].shape == (5, 48, 64)
    assert c["flow"].shape == (4, 2, 48, 64) and c["labelled"].all()
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["frames"].shape == (2, 3, 3, 48, 64)
    assert isinstance(build_dataset("synthetic", num_clips=1, length=2, size=32), SyntheticVideo)


# ----------------------------------------------------------------------------- triplets


def test_triplet_sampling_respects_clip_ends():
    rng = np.random.default_rng(0)
    for n, t in [(30, 0), (30, 29), (30, 15), (5, 2), (1, 0)]:
        for _ in range(200):
            p, l, q = sample_triplet(t, n, 4, rng)
            assert l == t and 0 <= p <= t <= q <= n - 1
            assert t - p <= 4 and q - t <= 4
    seen = {sample_triplet(15, 30, 4, rng)[0] for _ in range(300)}
    assert seen == {11, 12, 13, 14}
    assert sample_triplet(0, 30, 4, rng)[0] == 0  # clamped at the start
    with pytest.raises(ValueError, match="label_index"):
        sample_triplet(5, 5, 2, rng)


@pytest.mark.parametrize("flip_only", [False, True])
def test_augmentation_shared_by_triplet_and_flow_transformed(flip_only):
    aug = TripletAugment(scale=(1.0, 1.0), hflip=True) if flip_only else \
        TripletAugment(scale=(0.6, 1.4), crop_size=(48, 56))
    ds = SyntheticVideo(num_clips=1, length=6, size=(64, 80), difficulty=0.0, max_distance=2, augment=aug,
                        sample_seed=1)
    plain = SyntheticVideo(num_clips=1, length=6, size=(64, 80), difficulty=0.0, max_distance=2, sample_seed=1)
    flips = set()
    for i in range(6):
        item = ds[i]
        raw = plain[i]
        if flip_only:
            flipped = torch.equal(item["label"], raw["label"].flip(-1))
            assert flipped or torch.equal(item["label"], raw["label"])
            flips.add(flipped)
        else:
            assert item["frames"].shape == (3, 3, 48, 56) and item["flow"].shape == (2, 2, 48, 56)
        assert item["offsets"].tolist() == raw["offsets"].tolist()
        # warping each neighbour with the transformed flow reproduces the labelled frame
        a = item["frames"][1:2]
        for k, src in ((0, 0), (1, 2)):
            vis = ~item["occlusion"][k] & (item["label"] != 255)
            if int(item["offsets"][src]) == 0 or vis.sum() < 100:
                continue
            warped = grid_warp(item["frames"][src:src + 1], item["flow"][k:k + 1])
            err = (warped - a).abs().mean(1)[0][vis]
            zero = (item["frames"][src:src + 1] - a).abs().mean(1)[0][vis]
            assert err.median() < 0.25 * zero.median() + 0.5, (i, k, err.median(), zero.median())
    if flip_only:
        assert flips == {True, False}


def test_augmentation_identical_frames_stay_identical_and_flip_negates_flow():
    frames = torch.rand(1, 3, 20, 30).expand(3, 3, 20, 30).clone() * 255
    flow = torch.zeros(2, 2, 20, 30)
    flow[:, 0] = 1.5
    sample = {"frames": frames, "label": torch.zeros(20, 30, dtype=torch.long), "flow": flow,
              "occlusion": torch.zeros(2, 20, 30, dtype=torch.bool)}
    aug = TripletAugment(scale=(2.0, 2.0), crop_size=(16, 16), hflip=True)
    signs = set()
    for seed in range(8):
        out = aug(sample, np.random.default_rng(seed))
        f = out["frames"]
        assert torch.equal(f[0], f[1]) and torch.equal(f[1], f[2])
        assert torch.allclose(out["flow"][:, 1], torch.zeros(2, 16, 16))
        signs.add(float(out["flow"][0, 0, 0, 0]))
    assert signs == {3.0, -3.0}  # scaled by 2, negated on flips
    # crops larger than the image pad: label 255, occlusion True
    out = TripletAugment(scale=(1.0, 1.0), crop_size=(24, 40), hflip=False)(sample, np.random.default_rng(0))
    assert out["frames"].shape == (3, 3, 24, 40)
    assert (out["label"] == 255).sum() == 24 * 40 - 20 * 30
    assert int(out["occlusion"].sum()) == 2 * (24 * 40 - 20 * 30)
    with pytest.raises(ValueError, match="scale"):
        TripletAugment(scale=(2.0, 1.0))


# ----------------------------------------------------------------------------- CamVid


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"shared CamVid sample not found at {CAMVID}")
def test_camvid_shared_sample():
    ds = CamVid(CAMVID, "val", size=(90, 120), max_distance=3, sample_seed=0)
    assert len(ds) == 101 and ds.num_classes == 11 and ds.seq_names == ["0016E5"]
    item = ds[0]
    assert item["frames"].shape == (3, 3, 90, 120)
    assert item["offsets"][0] == 0  # first frame: the previous neighbour is clamped
    values = set(item["label"].unique().tolist())
    assert values <= set(range(11)) | {255} and len(values) > 4
    last = ds[100]
    assert last["offsets"][2] == 0
    raw = CamVid(CAMVID, "val")[50]
    assert raw["frames"].shape == (3, 3, 360, 480) and raw["frames"].max() > 200
    clips = CamVid(CAMVID, "val", mode="clip", clip_length=4, size=(45, 60))
    c = clips[0]
    assert c["frames"].shape == (4, 3, 45, 60) and c["labelled"].all()


def _write_png(path, array):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def test_camvid_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CamVid(tmp_path / "nowhere")
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    with pytest.raises(ValueError, match="empty"):
        CamVid(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="train"):
        CamVid(tmp_path, "train")
    _write_png(tmp_path / "valannot" / "seq_00001.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(FileNotFoundError, match="seq_00001.png"):
        CamVid(tmp_path, "val")


def test_camvid_frame_range_splits_a_sequence_in_time(shared_data):
    root = shared_data / "camvid_0016E5"
    if not root.is_dir():
        pytest.skip(f"shared CamVid sample not found at {root}")
    full = CamVid(root, "val")
    train = CamVid(root, "val", frame_range=[0, 64], size=(45, 60), max_distance=5, sample_seed=0)
    assert len(train) == 64 and train.seq_lengths == [64] and train.seq_labelled == [list(range(64))]
    assert train._frames[0] == full._frames[0][:64] and train.frame_range == (0, 64)
    held = CamVid(root, "val", frame_range=(72, 101), size=(45, 60), max_distance=5, sample_seed=0)
    assert len(held) == 29 and held.seq_lengths == [29] and held._frames[0] == full._frames[0][72:]
    # neighbours stay inside the range: clamped at its first / last frame
    for ds, idx, end in ((train, 63, 63), (held, 0, 0)):
        for seed in range(4):
            ds.sample_seed = seed
            off = ds[idx]["offsets"].tolist()
            assert 0 <= idx + off[0] <= idx <= idx + off[2] <= len(ds) - 1
            assert off[2 if end else 0] == 0
    # evaluation: the held-out range as one clip of consecutive, labelled frames
    clips = CamVid(root, "val", mode="clip", clip_length=None, frame_range=[72, 101], size=(45, 60))
    assert len(clips) == 1
    c = clips[0]
    assert c["frames"].shape == (29, 3, 45, 60) and c["labelled"].all()
    ref = CamVid(root, "val", mode="clip", clip_length=1, size=(45, 60))[72]
    assert torch.equal(c["frames"][0], ref["frames"][0]) and torch.equal(c["labels"][0], ref["labels"][0])


@pytest.mark.parametrize("bad", [[0, 0], [5, 2], [0, 5], [-1, 2],  # 4 labelled frames
                                 [0.0, 2], "0:2", [1, 2, 3], [True, 2], 3])
def test_camvid_frame_range_errors(tmp_path, bad):
    for n in (10, 12, 14, 16):
        _write_png(tmp_path / "val" / f"seq_{n:05d}.png", np.zeros((8, 8, 3), np.uint8))
        _write_png(tmp_path / "valannot" / f"seq_{n:05d}.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="frame_range"):
        CamVid(tmp_path, "val", frame_range=bad)
    assert len(CamVid(tmp_path, "val", frame_range=[0, 4])) == 4


def test_camvid_sequences_with_f_prefixed_frame_numbers(tmp_path):
    # CamVid names 0006R0 / Seq05VD frames '<seq>_f<number>': they are sequences too
    for stem in ("0006R0_f00930", "0006R0_f00960", "0006R0_f00990", "Seq05VD_f00000", "Seq05VD_f00030"):
        _write_png(tmp_path / "val" / f"{stem}.png", np.zeros((8, 8, 3), np.uint8))
        _write_png(tmp_path / "valannot" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    ds = CamVid(tmp_path, "val", max_distance=1, sample_seed=0)
    assert ds.seq_names == ["0006R0", "Seq05VD"] and ds.seq_lengths == [3, 2]
    assert [p.name for p in ds._frames[0]] == ["0006R0_f00930.png", "0006R0_f00960.png", "0006R0_f00990.png"]
    assert ds[1]["offsets"].tolist() == [-1, 0, 1]


def test_camvid_frame_range_with_frames_dir_and_two_sequences(tmp_path):
    # labelled frames a_10, a_12, a_14, a_16, b_3, b_5; all frames of both videos in frames_dir
    for seq, labelled, frames in (("a", (10, 12, 14, 16), range(9, 18)), ("b", (3, 5), range(8))):
        for n in labelled:
            _write_png(tmp_path / "val" / f"{seq}_{n:05d}.png", np.full((8, 8, 3), n, np.uint8))
            _write_png(tmp_path / "valannot" / f"{seq}_{n:05d}.png", np.full((8, 8), n % 11, np.uint8))
        for n in frames:
            _write_png(tmp_path / "all" / f"{seq}_{n:05d}.png", np.full((8, 8, 3), n, np.uint8))
    ds = CamVid(tmp_path, "val", frames_dir=tmp_path / "all", frame_range=[1, 3], max_distance=9, sample_seed=0)
    # labelled a_12, a_14: frames 12..14 only (the unlabelled a_13 between them is kept)
    assert ds.seq_names == ["a"] and ds.seq_lengths == [3] and ds.seq_labelled == [[0, 2]]
    for seed in range(6):
        ds.sample_seed = seed
        nums = ds[1]["frames"][:, 0, 0, 0].tolist()
        assert nums[1] == 14 and 12 <= nums[0] <= 14 and nums[2] == 14
    # a range across the two sequences: a_16 (alone: one frame) and b_3, b_5 (frames 3..5)
    ds = CamVid(tmp_path, "val", frames_dir=tmp_path / "all", frame_range=[3, 6])
    assert ds.seq_names == ["a", "b"] and ds.seq_lengths == [1, 3] and ds.seq_labelled == [[0], [0, 2]]
    assert [p.name for p in ds._frames[1]] == ["b_00003.png", "b_00004.png", "b_00005.png"]
    clips = CamVid(tmp_path, "val", frames_dir=tmp_path / "all", frame_range=[3, 6], mode="clip")
    assert [c["frames"].shape[0] for c in clips] == [1, 3]
    assert clips[1]["labelled"].tolist() == [True, False, True]


# ----------------------------------------------------------------------------- Cityscapes


def _fake_cityscapes(root, frames=range(5, 30), labelled=19, h=16, w=32):
    city, seq = "aachen", "000042"
    for f in frames:
        img = np.full((h, w, 3), f * 8, np.uint8)
        _write_png(root / "leftImg8bit_sequence" / "train" / city / f"{city}_{seq}_{f:06d}_leftImg8bit.png", img)
    lab = np.zeros((h, w), np.uint8)
    lab[:, : w // 4] = 7   # road -> 0
    lab[:, w // 4: w // 2] = 26  # car -> 13
    lab[:, w // 2:] = 4    # static -> ignore
    _write_png(root / "gtFine" / "train" / city / f"{city}_{seq}_{labelled:06d}_gtFine_labelIds.png", lab)
    return root


def test_cityscapes_fake_tree(tmp_path):
    root = _fake_cityscapes(tmp_path)
    ds = Cityscapes(root, "train", max_distance=30, sample_seed=3)
    assert len(ds) == 1 and ds.num_classes == 19
    # snippet f-19 .. f+10 clamped to the frames present: 5 .. 29
    assert ds.seq_lengths == [25] and ds.seq_labelled == [[14]]
    for i in range(20):
        ds.sample_seed = i
        item = ds[0]
        off = item["offsets"].tolist()
        assert -14 <= off[0] <= 0 <= off[2] <= 10
        # frame value encodes its number: check the right files were read
        nums = (item["frames"][:, 0, 0, 0] / 8).round().long().tolist()
        assert nums == [19 + off[0], 19, 19 + off[2]]
    label = item["label"]
    assert set(label.unique().tolist()) == {0, 13, 255}
    assert (label[:, :8] == 0).all() and (label[:, 8:16] == 13).all() and (label[:, 16:] == 255).all()
    clip = Cityscapes(root, "train", mode="clip")[0]
    assert clip["frames"].shape == (25, 3, 16, 32) and clip["labelled"].tolist().count(True) == 1
    assert clip["labelled"][14] and (clip["labels"][0] == 255).all()


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        Cityscapes(tmp_path / "missing_root")
    (tmp_path / "leftImg8bit_sequence" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        Cityscapes(tmp_path, "val")
    root = _fake_cityscapes(tmp_path / "c", frames=range(0, 10), labelled=19)
    with pytest.raises(FileNotFoundError, match="aachen_000042_000019_leftImg8bit.png"):
        Cityscapes(root, "train")
