"""ARCHITECTURE.md's arrows, kept true: every import inside the project points the way it says."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each part and the parts it may import (ARCHITECTURE.md draws the same). A module at the top of
# `pipeline/` is a stage or the edge (cli, config, errors): stages may import any part.
MAY_IMPORT = {
    "pipeline.errors": set(),
    "pipeline.model": {"pipeline.errors"},
    "pipeline.data": {"pipeline.errors", "pipeline.model"},
    "pipeline.config": {"pipeline.errors", "pipeline.model"},
    "pipeline.training": {"pipeline.errors", "pipeline.model", "pipeline.data", "pipeline.config"},
    "pipeline.scoring": {"pipeline.errors", "pipeline.model", "pipeline.data", "pipeline.config"},
    "pipeline.tracking": {
        "pipeline.errors",
        "pipeline.model",
        "pipeline.data",
        "pipeline.config",
        "pipeline.training",
    },
}
PARTS = tuple(MAY_IMPORT)
# registry/ may use all of pipeline/; inside it, serving is layered: what a refusal is, below what
# a body may be and the metrics, below the guards, below the app, below its worker and command.
REGISTRY_LAYERS = (
    {"batching", "protocols", "inference_log"},
    {"refusals"},
    {"bodies", "metrics"},
    {"guards"},
    {"gateway"},
    {"worker"},
    {"server", "promote"},
)


def part_of(module: str) -> str:
    """`pipeline.training.loop` -> `pipeline.training`; a stage module -> `pipeline.<stage>`."""
    for part in PARTS:
        if module == part or module.startswith(part + "."):
            return part
    return ".".join(module.split(".")[:2])


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.level == 0 else []
            if node.module.split(".")[0] in ("pipeline", "registry"):
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("pipeline", "registry")}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(module: str) -> int:
    name = module.split(".")[1]
    return next(i for i, names in enumerate(REGISTRY_LAYERS) if name in names)


def test_imports_point_only_the_way_architecture_md_draws():
    wrong = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "registry").rglob("*.py")]):
        me = module_name(path)
        mine = part_of(me)
        for target in project_imports(path):
            theirs = part_of(target)
            if theirs == mine or target in ("pipeline", "registry"):
                continue
            if mine.startswith("registry"):
                if theirs.startswith("registry") and layer(theirs) > layer(mine):
                    wrong.append(f"{me} imports {target}: registry/'s layers point downwards")
                continue  # registry/ may use all of pipeline/
            if theirs.startswith("registry"):
                wrong.append(f"{me} imports {target}: pipeline/ never imports registry/")
            elif mine in MAY_IMPORT and theirs not in MAY_IMPORT[mine]:
                wrong.append(f"{me} imports {target}: {mine} may import {sorted(MAY_IMPORT[mine])}")
            elif mine not in MAY_IMPORT and theirs not in PARTS:
                wrong.append(f"{me} (a stage) imports {target}: stages use parts, not each other")
    assert not wrong, "\n".join(wrong)


def test_architecture_md_lists_every_package_and_module():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name != "__init__.py":
            assert f"`{path.stem}`" in text, f"ARCHITECTURE.md does not mention {path}"
    for package in sorted(p.parent for p in (ROOT / "pipeline").glob("*/__init__.py")):
        assert f"`{package.relative_to(ROOT)}/`" in text, f"ARCHITECTURE.md has no {package}"
    for path in sorted((ROOT / "registry").glob("*.py")):
        if path.name != "__init__.py":
            assert f"`{path.stem}`" in text, f"ARCHITECTURE.md does not mention {path}"
            assert any(path.stem in names for names in REGISTRY_LAYERS), f"no layer for {path}"


def module_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports, lazy imports included."""
    paths = [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "registry").rglob("*.py")]
    modules = {module_name(path): path for path in paths}
    return {
        name: {target for target in project_imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_no_module_imports_itself_in_a_circle():
    graph, done, circles = module_graph(), set(), []

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            circles.append(" -> ".join([*trail[trail.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not circles, "\n".join(circles)
