"""Package structure: no import cycles between mdpo modules, counting imports inside functions too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mdpo"


def imports_of(path: Path) -> set[str]:
    """mdpo modules that `path` imports anywhere (top level or inside a function); `if TYPE_CHECKING:` blocks
    are type hints, not imports, and are left out."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mdpo"):
            if node.module == "mdpo":
                out |= {a.name for a in node.names}
            else:
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mdpo.")}
    return out


def test_no_import_cycles():
    graph = {p.stem: imports_of(p) - {p.stem} for p in PKG.glob("*.py")}
    assert {"train", "model", "weights", "executor", "sandbox", "objectives", "config"} <= set(graph)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)
