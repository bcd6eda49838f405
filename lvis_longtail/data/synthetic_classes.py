"""The classes of the synthetic dataset (:mod:`.synthetic`): a shape and a color each, and
their long-tailed frequencies.

Every class is a (shape, color) pair, so appearance alone identifies it. Half of the shapes are
thin or hollow (ring, frame, diagonal bar, L, thin plus, thin X), with mask area well below half
of their box area. Train classes follow a log-linear long tail (LVIS-like frequent, common and
rare groups); val and test-dev use the square root of those weights, renormalized.
"""

import itertools

import numpy as np

COLORS = {  # RGB, saturated and far from the low-saturation background
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "magenta": (215, 40, 205),
    "cyan": (30, 205, 215),
    "orange": (250, 140, 10),
}
# Head-to-tail ratio of the train class weights (log-linear in frequency rank).
TRAIN_HEAD_TAIL_RATIO = 500.0
_RANK_SEED = 1234  # fixed, so class frequencies do not change with ``seed``
_SQUARE = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
_RHOMBUS = np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])


def _rot(points, degrees):
    """Rotate (N, 2) points about the origin by ``degrees``."""
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.asarray(points, dtype=np.float64) @ rot.T


def _arc(radius, start, stop, n, rx=None):
    """(n, 2) points on an elliptical arc from ``start`` to ``stop`` degrees."""
    a = np.deg2rad(np.linspace(start, stop, n))
    return np.stack([(rx or radius) * np.cos(a), radius * np.sin(a)], axis=1)


def _arc_points(s):
    return int(np.clip(s, 16, 48))


def _cross(s, t, angle):
    """A plus of two strokes (length ``s``, width ``t``) rotated by ``angle``: 12 vertices."""
    arm = [(-t / 2, -s / 2), (t / 2, -s / 2), (t / 2, -t / 2)]
    return [_rot(np.concatenate([_rot(arm, 90 * k) for k in range(4)]), angle)]


def _ring(rng, s, t):
    r_out, r_in, n = s / 2, s / 2 - t, _arc_points(s) // 2 + 1
    halves = [(-5.0, 185.0), (175.0, 365.0)]  # overlapping halves: their union has no seam
    return [np.concatenate([_arc(r_out, a, b, n), _arc(r_in, b, a, n)]) for a, b in halves]


def _frame(rng, s, t):
    a = 0.4 * s
    strips = [(-a, -a, a, -a + t), (-a, a - t, a, a), (-a, -a, -a + t, a), (a - t, -a, a, a)]
    angle = rng.uniform(-15, 15)
    return [_rot([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], angle) for x0, y0, x1, y1 in strips]


def _bar(rng, s, t):
    pts = [(-s / 2, -t / 2), (s / 2, -t / 2), (s / 2, t / 2), (-s / 2, t / 2)]
    return [_rot(pts, rng.choice([-1.0, 1.0]) * rng.uniform(20, 70))]  # never axis-aligned


def _lshape(rng, s, t):
    n = 0.8 * s
    pts = np.array([(0, 0), (n, 0), (n, t), (t, t), (t, n), (0, n)]) - n / 2
    return [_rot(pts, 90 * rng.integers(4) + rng.uniform(-15, 15))]


def _star(rng, s, t):
    radii = np.tile([s / 2, 0.45 * s / 2], 5)
    a = np.deg2rad(np.arange(10) * 36.0 + rng.uniform(0, 72))
    return [np.stack([radii * np.cos(a), radii * np.sin(a)], axis=1)]


def _ellipse(rng, s, t):
    return [_rot(_arc(s / 4, 0, 360, _arc_points(s), rx=s / 2)[:-1], rng.uniform(0, 180))]


# name -> (builder(rng, size, thickness) -> list of (N, 2) polygons about the origin, thin?).
# Filled and thin shapes alternate, so any K >= 2 gets both kinds.
SHAPES = {
    "square": (lambda r, s, t: [_rot(_SQUARE * 0.4 * s, r.uniform(-15, 15))], False),
    "ring": (_ring, True),
    "disk": (lambda r, s, t: [_arc(s / 2, 0, 360, _arc_points(s))[:-1]], False),
    "frame": (_frame, True),
    "triangle": (lambda r, s, t: [_rot(_arc(s / 2, 0, 240, 3), r.uniform(0, 120))], False),
    "bar": (_bar, True),
    "diamond": (lambda r, s, t: [_rot(_RHOMBUS * s / 2, r.uniform(-15, 15))], False),
    "lshape": (_lshape, True),
    "star": (_star, False),
    "thin_plus": (lambda r, s, t: _cross(s, t, r.uniform(-10, 10)), True),
    "ellipse": (_ellipse, False),
    "thin_x": (lambda r, s, t: _cross(s, t, 45 + r.uniform(-10, 10)), True),
}
_SHAPE_NAMES = tuple(SHAPES)
_COLOR_NAMES = tuple(COLORS)


def class_specs(num_classes):
    """The (shape, color) of each class: class ``i`` (0-based) gets shape ``i % 12``.

    Returns:
        list of (shape_name, color_name), length ``num_classes``, all pairs distinct.
    """
    ns, nc = len(_SHAPE_NAMES), len(_COLOR_NAMES)
    if not 1 <= num_classes <= ns * nc:
        raise ValueError(f"num_classes must be in [1, {ns * nc}], got {num_classes}")
    return [
        (_SHAPE_NAMES[i % ns], _COLOR_NAMES[(i // ns + 3 * (i % ns)) % nc])
        for i in range(num_classes)
    ]


def class_weights(num_classes, split, head_tail_ratio=TRAIN_HEAD_TAIL_RATIO):
    """Sampling weights of the classes, (K,), summing to 1.

    Train: log-linear in a frequency rank (head / tail = ``head_tail_ratio``; 1 = uniform). The
    rank order is fixed (independent of the seed) and alternates filled and thin classes, each
    kind shuffled, so every frequency group holds both kinds in equal measure.
    Val and test-dev: the square root of the train weights, renormalized.
    """
    if head_tail_ratio < 1:
        raise ValueError(f"head_tail_ratio must be >= 1, got {head_tail_ratio}")
    rng = np.random.default_rng(_RANK_SEED)
    thin = np.array([SHAPES[shape][1] for shape, _ in class_specs(num_classes)])
    kinds = [rng.permutation(np.flatnonzero(thin == t)).tolist() for t in (False, True)]
    order = [c for pair in itertools.zip_longest(*kinds) for c in pair if c is not None]
    ranks = np.argsort(order)
    beta = np.log(head_tail_ratio) / max(num_classes - 1, 1)
    w = np.exp(-beta * ranks)
    w = w if split == "train" else np.sqrt(w)
    return w / w.sum()


def class_quotas(total, weights, min_per_class):
    """Instance count per class: ``min_per_class`` each, the rest by largest remainder."""
    quotas = np.full(len(weights), min_per_class, dtype=np.int64)
    raw = (total - quotas.sum()) * np.asarray(weights)
    quotas += np.floor(raw).astype(np.int64)
    left = total - quotas.sum()
    quotas[np.argsort(-(raw - np.floor(raw)), kind="stable")[:left]] += 1
    return quotas


def assign_classes(rng, num_images, weights, min_per_class):
    """Draw 2-6 objects per image and deal out classes following ``weights``.

    Args:
        rng: a ``np.random.Generator``.
        num_images: number of images.
        weights: (K,) class weights summing to 1.
        min_per_class: instances every class gets, lowered to ``total // K`` if there are
            fewer than ``K * min_per_class`` objects in all.

    Returns:
        list (one per image) of 0-based class ids, rarest class (lowest quota) first, and the
        per-class quotas, (K,).
    """
    counts = rng.integers(2, 7, size=num_images)
    total, k = int(counts.sum()), len(weights)
    quotas = class_quotas(total, weights, min(min_per_class, total // k))
    labels = np.repeat(np.arange(k), quotas)
    rng.shuffle(labels)
    chunks = np.split(labels, np.cumsum(counts)[:-1])
    return [sorted(c.tolist(), key=lambda c_: (quotas[c_], c_)) for c in chunks], quotas
