"""The design's layering, checked on the source: torch-only layers never import Lightning, and dependencies point
one way (examples -> strategies/callbacks/modules -> parallel/schedules/scaling/optim/nn)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_dl"

TORCH_ONLY = (
    "lightning_dl.parallel",
    "lightning_dl.nn",
    "lightning_dl.optim",
    "lightning_dl.schedules",
    "lightning_dl.scaling",
)
UPPER = ("lightning_dl.strategies", "lightning_dl.callbacks", "lightning_dl.modules", "lightning_dl.cli")
FORBIDDEN = {
    **{layer: ("lightning", "pytorch_lightning", *UPPER) for layer in TORCH_ONLY},
    "lightning_dl.modules": ("lightning_dl.strategies", "lightning_dl.callbacks", "lightning_dl.cli"),
    "lightning_dl.callbacks": ("lightning_dl.strategies", "lightning_dl.modules", "lightning_dl.cli"),
    "lightning_dl.strategies": ("lightning_dl.callbacks", "lightning_dl.modules", "lightning_dl.cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(module: str, imports: set[str]) -> list[str]:
    rules = [forbidden for layer, forbidden in FORBIDDEN.items() if module == layer or module.startswith(layer + ".")]
    return sorted(
        name
        for name in imports
        for forbidden in rules
        for prefix in forbidden
        if name == prefix or name.startswith(prefix + ".")
    )


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layering(path: Path) -> None:
    module = _module_name(path)
    assert _violations(module, _imports(path)) == [], f"{module} imports across the layering"
    assert not any(name.split(".")[0] in ("examples", "tests") for name in _imports(path))


def test_the_check_catches_a_violation() -> None:
    assert _violations("lightning_dl.parallel.layout", {"torch", "lightning.pytorch"}) == ["lightning.pytorch"]
    assert _violations("lightning_dl.nn.models", {"lightning_dl.modules.classifier"}) == [
        "lightning_dl.modules.classifier"
    ]
    assert _violations("lightning_dl.modules.classifier", {"lightning", "lightning_dl.nn"}) == []
