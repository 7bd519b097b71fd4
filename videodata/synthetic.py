"""Procedural synthetic video with dense labels and exact optical flow / occlusion.

A clip is a stack of layers: layer 0 is a textured background plane (class 0), layers
1..N are textured objects (classes 1..C-1; the class sets the shape and the texture style,
each instance jitters colour, frequencies and aspect). Every layer has, at continuous
time tau, a similarity transform ``p = s(tau) R(theta(tau)) u + c(tau)`` from its canonical
coordinates u to image pixels p (smooth Lissajous translation + drift, rotation, pulsing
scale; the background pans, rotates and zooms slightly). Layers are drawn back to front.

Rendering is by inverse mapping (vectorised over layers and pixels): ``u = M_l(tau)^-1 p``,
the nearest layer whose shape contains u is visible, its texture is evaluated analytically
at u. Hence ground truth is exact: the flow t -> s at pixel p is ``M_l(s) M_l(t)^-1 p - p``
for the layer l visible at p at time t; p is occluded at s when that point leaves the
frame or a nearer layer covers it at s.

Nuisances that make a per-frame model flicker (scaled by ``difficulty``; 0 turns all off):
illumination flicker (per-frame gain, colour cast and brightness gradient), Gaussian
sensor noise, motion blur (average of sub-frame renders over an exposure interval).
Labels, flow and occlusion refer to the sharp render at the frame's time.

Everything is deterministic given the seed. A 30-frame 128x128 clip takes a few tenths of
a second on one CPU core.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["SyntheticClip", "SyntheticVideo", "generate_clip", "SHAPES"]

SHAPES = ("disc", "square", "triangle", "ring", "cross", "star", "diamond")


def _size2(size) -> Tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = int(size[0]), int(size[1])
    except Exception as exc:
        raise ValueError(f"size must be an int or (height, width), got {size!r}") from exc
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8, got {size!r}")
    return h, w


class _single_thread:
    """Run torch ops on one thread: the per-op work here is small, and intra-op threading
    on a busy machine made generation several times slower."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)
        return False


def _inside(shape_id: torch.Tensor, aspect: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shape membership of normalised canonical points (x, y) (L, ...) for each layer's shape."""
    a = aspect.view(-1, *([1] * (x.dim() - 1)))
    x = x / a
    y = y * a
    r2 = x * x + y * y
    out = torch.zeros_like(x, dtype=torch.bool)
    for sid in torch.unique(shape_id).tolist():
        sel = shape_id == sid
        xs, ys, rs = x[sel], y[sel], r2[sel]
        if sid == 0:  # disc
            m = rs <= 1.0
        elif sid == 1:  # square
            m = (xs.abs() <= 0.85) & (ys.abs() <= 0.85)
        elif sid == 2:  # triangle, vertices (0, -1), (+-0.866, 0.5)
            m = (ys <= 0.5) & (ys >= -1.0 + 1.732 * xs.abs())
        elif sid == 3:  # ring
            m = (rs <= 1.0) & (rs >= 0.3)
        elif sid == 4:  # cross
            m = ((xs.abs() <= 0.35) & (ys.abs() <= 1.0)) | ((ys.abs() <= 0.35) & (xs.abs() <= 1.0))
        elif sid == 5:  # five-pointed star
            ang = torch.atan2(ys, xs)
            m = rs.sqrt() <= 0.62 + 0.38 * torch.cos(5.0 * ang)
        else:  # diamond
            m = xs.abs() + ys.abs() <= 1.0
        out[sel] = m
    return out


class SyntheticClip:
    """One synthetic clip; frames are rendered on construction, flow on demand.

    Attributes: ``frames`` (T, 3, H, W) float32 in 0..255 (stored as uint8 ``frames_u8``), ``labels`` (T, H, W) int64,
    ``layers`` (T, H, W) int64 (visible layer id, 0 = background), ``layer_classes`` (L,).
    Methods: ``flow(t, s)`` (2, H, W) and ``occlusion(t, s)`` (H, W) bool (True = the point
    of frame t is hidden or out of frame at s), ``forward_flow()`` / ``backward_flow()``
    (T-1, 2, H, W) with their occlusions.
    """

    def __init__(self, seed: int = 0, length: int = 30, size=(128, 128), num_classes: int = 6,
                 num_objects: int = 5, difficulty: float = 1.0, noise: Optional[float] = None,
                 flicker: Optional[float] = None, blur: Optional[float] = None, speed: Optional[float] = None,
                 blur_samples: int = 3):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background + objects), got {num_classes!r}")
        if not isinstance(num_objects, int) or not 0 <= num_objects <= 254:
            raise ValueError(f"num_objects must be an int in [0, 254], got {num_objects!r}")
        if not difficulty >= 0:
            raise ValueError(f"difficulty must be >= 0, got {difficulty!r}")
        if not isinstance(blur_samples, int) or blur_samples < 1:
            raise ValueError(f"blur_samples must be a positive int, got {blur_samples!r}")
        self.seed = int(seed)
        self.length = length
        self.height, self.width = _size2(size)
        self.num_classes = num_classes
        self.num_objects = num_objects
        self.difficulty = float(difficulty)
        d = self.difficulty
        self.noise = 7.0 * d if noise is None else float(noise)
        self.flicker = 0.12 * d if flicker is None else float(flicker)
        self.blur = 0.6 * min(d, 1.5) if blur is None else float(blur)  # exposure, in frames
        self.speed = 2.5 if speed is None else float(speed)  # peak px/frame at 128 px
        self.blur_samples = blur_samples if self.blur > 0 else 1
        self._make_params(np.random.default_rng(self.seed))
        with _single_thread():
            self._render_all()

    # ------------------------------------------------------------------ parameters
    def _make_params(self, rng: np.random.Generator) -> None:
        h, w = self.height, self.width
        L = self.num_objects + 1
        C = self.num_classes
        ref = min(h, w)
        spd = self.speed * ref / 128.0
        jitter = 0.35 + 0.25 * min(self.difficulty, 2.0)  # instance variation within a class

        # Classes: cycle through all object classes so that each appears, then shuffle z-order.
        cls = np.array([1 + (i % (C - 1)) for i in range(self.num_objects)], dtype=np.int64)
        rng.shuffle(cls)
        cls = np.concatenate([[0], cls])
        self.layer_classes = torch.from_numpy(cls)

        # Class-level style: fixed by class id only (not the seed) so classes are learnable.
        style = np.random.default_rng(12345 + 7919 * C)
        cls_color = style.uniform(40, 215, size=(C, 3))
        cls_freq = style.uniform(0.12, 0.55, size=(C,))
        cls_sharp = style.choice([1.0, 4.0], size=(C,))
        cls_color[0] = style.uniform(90, 160, size=3)
        cls_freq[0] = 0.08

        shape_id = np.array([0] + [(c - 1) % len(SHAPES) for c in cls[1:]], dtype=np.int64)
        self.shape_id = torch.from_numpy(shape_id)
        self.aspect = torch.from_numpy(np.concatenate([[1.0], rng.uniform(0.75, 1.33, L - 1)])).float()
        self.radius = torch.from_numpy(np.concatenate([[1.0], rng.uniform(0.11, 0.24, L - 1) * ref])).float()

        # Motion: c(tau) = c0 + drift*tau + amp*sin(omega*tau + phase), per axis.
        c0 = np.stack([rng.uniform(0.2, 0.8, L) * w, rng.uniform(0.2, 0.8, L) * h], 1)
        amp = rng.uniform(0.1, 0.3, (L, 2)) * np.array([w, h])
        vmax = rng.uniform(0.5, 1.0, (L, 2)) * spd
        omega = vmax / amp  # peak speed of the sinusoid = amp * omega
        phase = rng.uniform(0, 2 * np.pi, (L, 2))
        drift = rng.normal(0, 0.15 * spd, (L, 2))
        # Background: pan (drift) with a gentle sway, no large excursions.
        c0[0] = (w / 2, h / 2)
        amp[0] = rng.uniform(2, 6, 2) * ref / 128.0
        omega[0] = rng.uniform(0.05, 0.15, 2)
        drift[0] = rng.normal(0, 0.6 * spd, 2)
        theta0 = rng.uniform(-np.pi, np.pi, L)
        omega_r = rng.normal(0, 0.03, L)
        theta0[0], omega_r[0] = 0.0, rng.normal(0, 0.004)
        s_amp = rng.uniform(0.0, 0.15, L)
        s_omega = rng.uniform(0.05, 0.2, L)
        s_phase = rng.uniform(0, 2 * np.pi, L)
        s_amp[0] = rng.uniform(0.0, 0.04)
        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self._motion = {k: f32(v) for k, v in dict(c0=c0, amp=amp, omega=omega, phase=phase, drift=drift,
                                                   theta0=theta0, omega_r=omega_r, s_amp=s_amp,
                                                   s_omega=s_omega, s_phase=s_phase).items()}

        # Texture: base colour + K oriented waves (tanh-sharpened: stripes for "sharp" classes).
        K = 3
        base = cls_color[cls] + rng.normal(0, 25 * jitter, (L, 3))
        freq = cls_freq[cls][:, None] * np.exp(rng.normal(0, 0.25 * jitter, (L, K)))
        ang = rng.uniform(0, np.pi, (L, K))
        self._tex = {
            "base": f32(np.clip(base, 20, 235)),
            "fx": f32(freq * np.cos(ang)), "fy": f32(freq * np.sin(ang)),
            "phase": f32(rng.uniform(0, 2 * np.pi, (L, K))),
            "sharp": f32(np.repeat(cls_sharp[cls][:, None], K, 1)),
            "col": f32(rng.normal(0, 1, (L, K, 3)) * rng.uniform(12, 35, (L, K, 1))),
        }
        # Per-frame nuisances.
        T = self.length
        self._gain = f32(np.clip(1.0 + self.flicker * rng.normal(0, 1, T), 0.4, 1.8))
        self._cast = f32(self.flicker * 40.0 * rng.normal(0, 1, (T, 3)))
        self._grad = f32(self.flicker * 60.0 * rng.normal(0, 1, (T, 2)))
        self._noise_seed = int(rng.integers(0, 2 ** 31 - 1))

    # ------------------------------------------------------------------ geometry
    def _pose(self, tau: float):
        m = self._motion
        c = m["c0"] + m["drift"] * tau + m["amp"] * torch.sin(m["omega"] * tau + m["phase"])  # (L, 2)
        th = m["theta0"] + m["omega_r"] * tau
        s = 1.0 + m["s_amp"] * torch.sin(m["s_omega"] * tau + m["s_phase"])
        return c, th, s

    def _grid(self):
        ys, xs = torch.meshgrid(torch.arange(self.height, dtype=torch.float32),
                                torch.arange(self.width, dtype=torch.float32), indexing="ij")
        return xs, ys

    def _to_canonical(self, tau, px, py):
        """Canonical coords of image points (..) for every layer: (L, ..)."""
        c, th, s = self._pose(tau)
        shp = (-1,) + (1,) * px.dim()
        dx = px.unsqueeze(0) - c[:, 0].view(shp)
        dy = py.unsqueeze(0) - c[:, 1].view(shp)
        cos, sin, s = torch.cos(th).view(shp), torch.sin(th).view(shp), s.view(shp)
        return (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s

    def _to_image(self, tau, ux, uy, layer):
        """Image position at ``tau`` of canonical points (ux, uy) of layers ``layer`` (same shape)."""
        c, th, s = self._pose(tau)
        cos, sin, s = torch.cos(th)[layer], torch.sin(th)[layer], s[layer]
        return s * (cos * ux - sin * uy) + c[layer, 0], s * (sin * ux + cos * uy) + c[layer, 1]

    def _coverage(self, ux, uy):
        """(L, ..) bool: layer l covers the point (background covers everything)."""
        shp = (-1,) + (1,) * (ux.dim() - 1)
        r = self.radius.view(shp)
        cov = _inside(self.shape_id, self.aspect, ux / r, uy / r)
        cov[0] = True
        return cov

    def _visible(self, tau, px, py):
        ux, uy = self._to_canonical(tau, px, py)
        cov = self._coverage(ux, uy)
        L = cov.shape[0]
        ids = torch.arange(L).view((-1,) + (1,) * px.dim())
        vis = torch.where(cov, ids, torch.zeros_like(ids)).amax(0)  # nearest = highest id
        vx = ux.gather(0, vis.unsqueeze(0))[0]
        vy = uy.gather(0, vis.unsqueeze(0))[0]
        return vis, vx, vy

    def _texture(self, vis, ux, uy):
        t = self._tex
        arg = t["fx"][vis] * ux.unsqueeze(-1) + t["fy"][vis] * uy.unsqueeze(-1) + t["phase"][vis]  # (H, W, K)
        wave = torch.tanh(t["sharp"][vis] * torch.sin(arg)) / torch.tanh(t["sharp"][vis])
        rgb = t["base"][vis] + (wave.unsqueeze(-1) * t["col"][vis]).sum(-2)  # (H, W, 3)
        return rgb.permute(2, 0, 1)

    # ------------------------------------------------------------------ rendering
    def _render_all(self) -> None:
        T, H, W = self.length, self.height, self.width
        px, py = self._grid()
        # Stored compactly (uint8 frames, as a camera quantises; uint8 layer ids) so that many
        # clips fit in a cache; canonical coordinates are recomputed when flow is asked for.
        frames = torch.empty(T, 3, H, W, dtype=torch.uint8)
        layers = torch.empty(T, H, W, dtype=torch.uint8)
        n = self.blur_samples
        offsets = [0.0] if n == 1 else [self.blur * (j / (n - 1) - 0.5) for j in range(n)]
        gen = torch.Generator().manual_seed(self._noise_seed)
        xn = (px / max(W - 1, 1) - 0.5)
        yn = (py / max(H - 1, 1) - 0.5)
        for t in range(T):
            acc = torch.zeros(3, H, W)
            sharp = None
            for off in offsets:
                vis, ux, uy = self._visible(t + off, px, py)
                acc += self._texture(vis, ux, uy)
                if off == 0.0:
                    sharp = vis
            if sharp is None:  # even sample count: the sharp render gives the ground truth
                sharp = self._visible(float(t), px, py)[0]
            layers[t] = sharp.to(torch.uint8)
            img = acc / len(offsets)
            img = img * self._gain[t] + self._cast[t].view(3, 1, 1) \
                + self._grad[t, 0] * xn + self._grad[t, 1] * yn
            if self.noise > 0:
                img = img + self.noise * torch.randn(3, H, W, generator=gen)
            frames[t] = img.clamp(0, 255).round().to(torch.uint8)
        self.frames_u8 = frames
        self.layers_u8 = layers

    @property
    def frames(self) -> torch.Tensor:
        """(T, 3, H, W) float32 in 0..255."""
        return self.frames_u8.float()

    @property
    def layers(self) -> torch.Tensor:
        """(T, H, W) int64 visible layer id (0 = background)."""
        return self.layers_u8.long()

    @property
    def labels(self) -> torch.Tensor:
        """(T, H, W) int64 class ids."""
        return self.layer_classes[self.layers_u8.long()]

    # ------------------------------------------------------------------ ground truth
    def _check_t(self, t, name):
        if not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.length:
            raise ValueError(f"{name} must be a frame index in [0, {self.length}), got {t!r}")
        return int(t)

    def flow_and_occlusion(self, t: int, s: int):
        """Exact flow (2, H, W) from frame t to frame s and the occlusion mask (H, W) bool."""
        t, s = self._check_t(t, "t"), self._check_t(s, "s")
        with _single_thread():
            return self._flow_and_occlusion(t, s)

    def _flow_and_occlusion(self, t: int, s: int):
        H, W = self.height, self.width
        if t == s:
            return torch.zeros(2, H, W), torch.zeros(H, W, dtype=torch.bool)
        px, py = self._grid()
        vis, ux, uy = self._visible(float(t), px, py)
        qx, qy = self._to_image(float(s), ux, uy, vis)
        flow = torch.stack([qx - px, qy - py])
        out = (qx < 0) | (qx > W - 1) | (qy < 0) | (qy > H - 1)
        # Hidden at s: a nearer layer (higher id) covers the point's new position.
        ux, uy = self._to_canonical(float(s), qx, qy)
        cov = self._coverage(ux, uy)
        ids = torch.arange(cov.shape[0]).view(-1, 1, 1)
        hidden = (cov & (ids > vis.unsqueeze(0))).any(0)
        return flow, out | hidden

    def flow(self, t: int, s: int) -> torch.Tensor:
        return self.flow_and_occlusion(t, s)[0]

    def occlusion(self, t: int, s: int) -> torch.Tensor:
        return self.flow_and_occlusion(t, s)[1]

    def _pairs(self, step):
        fl, oc = [], []
        for t in range(self.length - 1):
            f, o = self.flow_and_occlusion(t, t + 1) if step > 0 else self.flow_and_occlusion(t + 1, t)
            fl.append(f)
            oc.append(o)
        if not fl:
            return torch.zeros(0, 2, self.height, self.width), torch.zeros(0, self.height, self.width, dtype=torch.bool)
        return torch.stack(fl), torch.stack(oc)

    def forward_flow(self):
        """(T-1, 2, H, W) flow t -> t+1 and (T-1, H, W) occlusion of frame t's pixels."""
        return self._pairs(+1)

    def backward_flow(self):
        """(T-1, 2, H, W) flow t+1 -> t and (T-1, H, W) occlusion of frame t+1's pixels."""
        return self._pairs(-1)


def generate_clip(seed: int = 0, **kwargs) -> SyntheticClip:
    """``SyntheticClip(seed, **kwargs)``: length, size, num_classes, num_objects, difficulty, ..."""
    return SyntheticClip(seed, **kwargs)


# --------------------------------------------------------------------------- data set

from collections import OrderedDict as _OrderedDict  # noqa: E402

from .base import VideoSegDataset  # noqa: E402


class SyntheticVideo(VideoSegDataset):
    """Data set of ``num_clips`` synthetic clips (the built-in default; no files needed).

    Clip i is ``SyntheticClip(seed_i, ...)`` with seed_i derived from (``seed``, i), so the
    whole data set is deterministic per seed. Frames every ``label_stride`` are labelled
    (all by default). Items carry exact ground-truth ``flow`` and ``occlusion``. Generated
    clips are kept in a per-process LRU cache (``cache_size`` clips; a 30-frame 128x128
    clip takes 2 MB). Options of the
    clips: ``length``, ``size``, ``num_classes``, ``num_objects``, ``difficulty`` and
    ``clip_options`` (noise, flicker, blur, speed); of the items: see ``VideoSegDataset``.
    """

    def __init__(self, num_clips: int = 16, length: int = 30, size=(128, 128), num_classes: int = 6,
                 num_objects: int = 5, difficulty: float = 1.0, seed: int = 0, label_stride: int = 1,
                 cache_size: int = 64, clip_options: Optional[dict] = None, **options):
        if not isinstance(num_clips, int) or num_clips < 1:
            raise ValueError(f"num_clips must be a positive int, got {num_clips!r}")
        if not isinstance(label_stride, int) or label_stride < 1:
            raise ValueError(f"label_stride must be a positive int, got {label_stride!r}")
        self.num_classes = num_classes
        self.class_names = ("background",) + tuple(f"{SHAPES[(c - 1) % len(SHAPES)]}{c}" for c in range(1, num_classes))
        self.seed = int(seed)
        self._clip_kwargs = dict(length=length, size=size, num_classes=num_classes, num_objects=num_objects,
                                 difficulty=difficulty, **(clip_options or {}))
        # validate the options once, cheaply
        SyntheticClip(0, **{**self._clip_kwargs, "length": 1})
        self.seq_names = [f"synthetic{self.seed}_{i:04d}" for i in range(num_clips)]
        self.seq_lengths = [length] * num_clips
        self.seq_labelled = [list(range(0, length, label_stride))] * num_clips
        self._cache: "_OrderedDict[int, SyntheticClip]" = _OrderedDict()
        self._cache_size = max(1, int(cache_size))
        self._setup(**options)

    def clip_seed(self, i: int) -> int:
        return int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])

    def clip(self, i: int) -> SyntheticClip:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        c = SyntheticClip(self.clip_seed(i), **self._clip_kwargs)
        self._cache[i] = c
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return c

    def _load_frames(self, seq, indices):
        return self.clip(seq).frames_u8[list(indices)].float()

    def _load_label(self, seq, index):
        c = self.clip(seq)
        return c.layer_classes[c.layers_u8[index].long()]

    def _gt_flow(self, seq, t, targets):
        c = self.clip(seq)
        pairs = [c.flow_and_occlusion(t, s) for s in targets]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
