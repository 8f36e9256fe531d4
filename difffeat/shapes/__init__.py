"""The shapes world: a procedural dataset with exact ground truth and the small model trained on it."""

from difffeat.shapes.world import SHAPE_CLASSES, ShapeSample, sample

__all__ = ["SHAPE_CLASSES", "ShapeSample", "sample"]
