"""The package layout shows the layers: imports flow one way, top to bottom, and no module reaches into
another's private names. Read from the source (ast), so a new module is checked without being listed."""
import ast
from pathlib import Path

import kdrun

PACKAGE = Path(kdrun.__file__).parent

# Top to bottom: a module may import from its own package or from any package below it.
LAYERS = [
    "cli",          # the `kdrun` command: argv, help, Hydra entry, exit codes
    "sweeps",       # Hydra callbacks, job bookkeeping, the sweep report (kdrun-report)
    "run",          # the pipeline of one run: context, paradigm, results -> metrics.json, table, TensorBoard
    "paradigms",    # which models a run trains and how (registered), each returning its evaluated models
    "stages",       # a model in a role, trained or loaded through the stage cache
    "deploy",       # the shipped model's files: export, int8 (post-training, quantization-aware), ONNX Runtime
    "tensorboard",  # event files, run summaries, soft-target figures
    "engine",       # the one training loop, step, evaluation, checkpoints, caches, DDP, speed switches
    "models",       # factory and feature taps
    "distill",      # loss terms
    "data",         # dataset builders
    "evaluation",   # metrics, cost, the printed table
    "config",       # the typed schema and the checks before any training (pure Python)
    "leaves",       # errors, registry, paths, run_files: used everywhere, import nothing above
]
ENTRY_POINTS = {"__main__"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or not (PACKAGE / parts[1]).is_dir():
        return "leaves"
    return parts[1]


def imports() -> list[tuple[str, str, list[str], int]]:
    """(importing module, imported module, imported names, line) for every kdrun import in kdrun/."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("kdrun", *path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdrun":
                found.append((module, node.module, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "kdrun"]
    return found


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS"
    top_level = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top_level) <= 6, f"modules directly under kdrun/: {top_level}"


def test_imports_flow_one_way():
    upward = []
    for module, imported, _, line in imports():
        source, target = layer_of(module), layer_of(imported)
        if module.split(".")[-1] in ENTRY_POINTS or source == target:
            continue
        if LAYERS.index(target) < LAYERS.index(source):
            upward.append(f"{module}:{line} imports {imported} ({source} -> {target})")
    assert upward == []


def test_no_private_name_crosses_modules():
    crossing = [f"{module}:{line} imports {name} from {imported}" for module, imported, names, line in imports()
                for name in names if name.startswith("_") and not name.endswith("__") and imported != module]
    assert crossing == []


def test_one_line_is_defined_once():
    definitions = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "one_line"]
    assert definitions == ["errors.py"]
