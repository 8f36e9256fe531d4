"""The diffusers internals difffeat uses (all behind :mod:`difffeat.backbones.diffusers_compat`) exist in the
installed diffusers, whose version is in the range they were checked against."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from packaging.version import Version

from difffeat.backbones.diffusers_compat import INTERNALS, TESTED_DIFFUSERS, resolve

ROOT = Path(__file__).resolve().parents[1] / "difffeat"
SHIM = ROOT / "backbones" / "diffusers_compat.py"
#: modules the layout refactor of issue 30 rewrites; their dispatcher accesses move to the shim with it
PENDING: set = set()


def test_installed_diffusers_is_in_the_checked_range():
    import diffusers

    low, high = (Version(v) for v in TESTED_DIFFUSERS)
    assert low <= Version(diffusers.__version__) < high, (
        f"diffusers {diffusers.__version__} is outside {TESTED_DIFFUSERS}: check INTERNALS, then widen the range")


@pytest.mark.parametrize("module, attribute", INTERNALS, ids=[a for _, a in INTERNALS])
def test_each_internal_still_exists(module, attribute):
    resolve(module, attribute)  # raises ImportError / AttributeError when diffusers moved it


def test_a_missing_internal_is_reported():
    with pytest.raises(AttributeError):
        resolve("diffusers.models.attention_dispatch", "_AttentionBackendRegistry._no_such_attribute")


def _private_diffusers_accesses(path: Path) -> list[str]:
    """``_name`` attributes read off anything but ``self``/``cls``/torch, ``getattr``/``hasattr`` with a ``_name``,
    and imports from diffusers submodules, in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base not in ("self", "cls") and not base.startswith(("torch", "self.")) or base.startswith("self.pipeline"):
                found.append(f"{path.name}:{node.lineno}: {base}.{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") and len(node.args) > 1:
            name = node.args[1]
            if isinstance(name, ast.Constant) and str(name.value).startswith("_") and not str(name.value).startswith("__"):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers."):
            found.append(f"{path.name}:{node.lineno}: from {node.module}")
    return found


#: not diffusers: torch.compile's wrapper (base.py), difffeat's own technique object (shift/gate.py), the
#: public single-file loader mixin and logging utilities
ALLOWED = ("torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'",  # torch, not diffusers
           "torch.ops.mkldnn, '_linear_pointwise'", "weight._version",  # torch's oneDNN op, a tensor's version
           "super()._forward",  # difffeat's own FeatureExtractor._forward, extended by shift.combined
           "getattr(module, '_orig_mod', module)", "technique._controlnet", "from diffusers.loaders",
           "from diffusers.utils")


def test_no_diffusers_internal_outside_the_shim():
    runtime = [p for p in sorted(ROOT.rglob("*.py")) if p != SHIM and p not in PENDING
               and "devtools" not in p.parts and p.name not in ("testing.py", "architectures.py")]
    found = [f for p in runtime for f in _private_diffusers_accesses(p) if not any(a in f for a in ALLOWED)]
    assert found == []


def test_the_scan_finds_a_planted_internal(tmp_path):
    planted = tmp_path / "adapter.py"
    planted.write_text("def f(self, x):\n    return self.pipeline._pack_latents(x)\n")
    assert _private_diffusers_accesses(planted) == ["adapter.py:2: self.pipeline._pack_latents"]
