"""The layer rule of STYLE.md: modules import only from layers below (or beside, where allowed)."""

from __future__ import annotations

import ast

from conftest import REPO

# Layer of each top-level name of ours; a module may import from a strictly lower layer, or from
# its own package. losses | samplers | likelihood | datasets are siblings and never import each
# other; samplers and likelihood never import models.
PACKAGE = "score_sde"
LAYERS = {
    "score_sde.__init__": 0,  # imports nothing of ours (importing a layer there would cycle)
    "score_sde.utils": 0,
    "sde_lib": 1,
    "score_sde.oracle": 2,
    "models": 2,
    "score_sde.divergence": 2,
    "score_sde.discrete_diffusion": 2,  # shared discrete-diffusion math (sde_lib, utils only)
    "score_sde.losses": 3,
    "samplers": 3,
    "likelihood": 3,
    "score_sde.datasets": 3,
    "score_sde.training": 4,
    "score_sde.evaluation": 4,
    "score_sde.cli": 5,
    "main": 6,
}
FORBIDDEN = {("samplers", "models"), ("likelihood", "models"), ("samplers", "score_sde.oracle"),
             ("likelihood", "score_sde.oracle"), ("score_sde.losses", "score_sde.oracle")}


def _layer_name(module: str) -> str:
    """``score_sde.training.loop`` -> ``score_sde.training``; ``models.utils`` -> ``models``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == PACKAGE and len(parts) > 1 else parts[0]


def _top(path) -> str:
    """The layer name of a module: its top-level name, or ``score_sde.<name>`` inside the
    toolkit's package."""
    parts = [p.removesuffix(".py") for p in path.relative_to(REPO).parts]
    return ".".join(parts[:2]) if parts[0] == PACKAGE and len(parts) > 1 else parts[0]


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _layer_name(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:  # from score_sde import losses, datasets
                for alias in node.names:
                    yield f"{PACKAGE}.{alias.name}"
            else:
                yield _layer_name(node.module)


def _checked_files():
    for path in sorted(REPO.glob("**/*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", "benchmarks", "build") or rel.parts[0].startswith("."):
            continue
        yield path, rel


def test_every_top_level_module_has_a_layer():
    """A new top-level module must be placed in LAYERS, or the import rule silently skips it."""
    unplaced = sorted({_top(path) for path, _ in _checked_files()} - set(LAYERS) - {"configs"})
    assert not unplaced, f"top-level modules without a layer in LAYERS: {unplaced}"


def test_layers_import_downwards():
    bad = []
    for path, rel in _checked_files():
        src = _top(path)
        if src == "configs":
            # configs are pure data: ml_collections only.
            for name in _imports(path):
                if name == "torch" or (name in LAYERS):
                    bad.append(f"{rel}: configs import {name}")
            continue
        if src not in LAYERS:
            continue
        for name in _imports(path):
            if name not in LAYERS or name == src:
                continue
            if LAYERS[name] >= LAYERS[src] or (src, name) in FORBIDDEN:
                bad.append(f"{rel} imports {name} (layer {LAYERS[name]} >= {LAYERS[src]})")
    assert not bad, "upward or sibling imports:\n" + "\n".join(bad)
