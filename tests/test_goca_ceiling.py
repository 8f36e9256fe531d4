"""The oracle-map ceiling benchmark builds the cross-attention a perfect model would have."""

from __future__ import annotations

import numpy as np
import torch

from difffeat.segment.prompts import PromptLayout

from _helpers import load_benchmark


def _module():
    return load_benchmark("goca_ceiling_shapes")


def test_oracle_map_puts_each_cells_class_fractions_on_its_tokens() -> None:
    oracle_map = _module().oracle_map
    gt = np.zeros((8, 8), np.uint8)
    gt[0:4, 0:4] = 3  # class 3: the top-left quadrant
    gt[6:8, 4:8] = 5  # class 5: half of the bottom-right quadrant
    layout = PromptLayout("a photo of triangle, heart, background", ["triangle", "heart"], [[4], [6, 7]],
                          ["background"], [[9]])  # fmt: skip
    m = oracle_map(gt, [3, 5], layout, (2, 2), n_tokens=12)[0]  # [4 cells, 12 tokens]
    torch.testing.assert_close(m.sum(1), torch.ones(4))  # a distribution over text positions at every cell
    # cells in raster order: top-left, top-right, bottom-left, bottom-right (each 4x4 pixels)
    torch.testing.assert_close(m[:, 4], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(m[:, 6] + m[:, 7], torch.tensor([0.0, 0.0, 0.0, 0.5]))  # 8 of 16 pixels
    torch.testing.assert_close(m[:, 6], m[:, 7])  # a two-token name shares its class evenly
    torch.testing.assert_close(m[:, 9], torch.tensor([0.0, 1.0, 1.0, 0.5]))  # object-free fraction
    assert m[:, [0, 1, 2, 3, 5, 8, 10, 11]].abs().sum() == 0  # nothing else: the cells are fully explained
