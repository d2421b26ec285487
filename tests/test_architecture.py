"""The layers of whalefast/__init__.py hold: no module imports a higher layer or a sibling on its own layer, and no import cycle."""

import ast
from pathlib import Path

import whalefast

PACKAGE = Path(whalefast.__file__).parent
LAYERS = {"whalefast": 0, "core": 1, "data": 2, "nets": 2, "db": 2, "runs": 3, "learn": 4, "match": 4, "stages": 5, "review": 6, "cli": 7, "__main__": 8}


def modules() -> dict[str, Path]:
    """Every whalefast module by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """The whalefast modules a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "whalefast" or n.startswith("whalefast.")}


def unit(module: str) -> str:
    """The layer unit of a module: its sub-package ('core', 'data', ...), 'cli', or 'whalefast' for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "whalefast"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {i for i in imports(p) if i in known and i != m} for m, p in known.items()}


def test_every_module_belongs_to_a_layer():
    assert {unit(m) for m in modules()} <= set(LAYERS)


def test_no_module_imports_a_higher_layer_or_a_sibling():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            here, there = unit(module), unit(target)
            if here != there and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{module} imports {target} ({there} is {'above' if LAYERS[there] > LAYERS[here] else 'beside'} {here})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


INFERENCE = ["whalefast.stages.prepare", "whalefast.stages.submit", "whalefast.stages.predict", "whalefast.stages.evaluate"]


def test_the_inference_side_never_imports_training():
    edges = graph()
    inference = [m for m in edges if unit(m) in ("match", "review")] + INFERENCE
    reached, todo = set(), list(inference)
    while todo:
        for target in edges[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert sorted(m for m in reached if unit(m) == "learn") == []


TRAINING_ONLY = ("fastai", "fastcore", "fasttransform", "sklearn", "pytorch_metric_learning", "accelerate", "matplotlib", "torchvision", "timm")


def test_matching_loads_no_training_library_until_it_builds_a_network():
    import subprocess
    import sys

    code = (
        "import sys, whalefast.cli, whalefast.match.matcher, whalefast.stages.predict, whalefast.stages.submit, whalefast.stages.catalogue, whalefast.review.app\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRAINING_ONLY!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"  # predict, submit, catalogue and serve start without fastai (seconds of imports on 2 cores)
