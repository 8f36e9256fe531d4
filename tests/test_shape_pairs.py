"""Shape pairs for correspondence: deterministic, same class, keypoints on the drawn shapes."""

from __future__ import annotations

import numpy as np

from difffeat.shapes import world
from difffeat.shapes.pairs import shape_pair


def test_pairs_are_deterministic_and_cycle_through_the_classes():
    a, b = shape_pair("test", 3), shape_pair("test", 3)
    assert np.array_equal(np.asarray(a.source), np.asarray(b.source)) and a.target_xy == b.target_xy
    assert [shape_pair("val", i).class_name for i in range(8)] == list(world.SHAPE_CLASSES)


def test_keypoints_correspond_one_to_one_and_lie_on_or_next_to_the_shape():
    for i in range(16):
        p = shape_pair("test", i)
        assert len(p.source_xy) == len(p.target_xy) >= 1
        for img, pts in ((p.source, p.source_xy), (p.target, p.target_xy)):
            arr = np.asarray(img).astype(int)
            (cx, cy), (ex, ey) = pts[0], pts[1] if len(pts) > 1 else pts[0]
            # the shape's colour: just inside its first extreme point (a ring's centre is a hole)
            centre = arr[int(round(cy + 0.85 * (ey - cy))), int(round(cx + 0.85 * (ex - cx)))]
            for k, (x, y) in enumerate(pts):
                assert 0 <= x < 64 and 0 <= y < 64
                if k == 0 and p.class_name == "ring":
                    continue  # a ring's centre is its hole
                # within 2 px of a pixel of the shape's colour (corners sit on the outline)
                ys, xs = np.nonzero((np.abs(arr - centre).sum(-1) == 0))
                assert np.min(np.hypot(xs - x, ys - y)) <= 2.0
        left, top, right, bottom = p.target_bbox
        assert all(left - 2 <= x <= right + 2 and top - 2 <= y <= bottom + 2 for x, y in p.target_xy)
