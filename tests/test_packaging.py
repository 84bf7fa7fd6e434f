"""The installed import name is ours alone: the kernels install as bdiff.kernels, and Hugging Face's `kernels`
package (installed by the test extra) imports beside them, from the repository root (where the top-level
kernels/ directory sits), from anywhere else (the editable install) and from a wheel."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTH = ("import kernels, bdiff.kernels.bd_attention as ours; "
        "print(kernels.__file__); print(ours.__file__); print(hasattr(kernels, 'get_kernel'))")


def imports_from(cwd):
    result = subprocess.run([sys.executable, "-c", BOTH], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_both_packages_import_from_the_repository_root_and_elsewhere(tmp_path):
    for cwd in (ROOT, str(tmp_path)):
        theirs, ours, has_get_kernel = imports_from(cwd)
        assert "site-packages" in theirs and has_get_kernel == "True", f"from {cwd}: `kernels` is not Hugging Face's"
        assert ours.endswith(os.path.join("bdiff", "kernels", "bd_attention.py")), f"from {cwd}: {ours}"


def test_wheel_holds_bdiff_kernels_and_no_top_level_kernels(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    for module in ("bd_attention", "masked_ce", "newton_schulz", "reference", "compile_check", "tiles"):
        assert f"bdiff/kernels/{module}.py" in names, f"{module} missing from the wheel"
    for data in ("bdiff/kernels/bd_attention_tiles.json", "bdiff/models/remote/configuration_bdiff.py",
                 "bdiff/models/remote/modeling_bdiff.py"):
        assert data in names, f"{data} missing from the wheel"
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level `kernels`"


def test_no_import_cycle_among_bdiffs_modules():
    """Every import of a bdiff module by another, at module level or inside a function, walked from the source: the
    graph has no cycle (a cycle hidden in a function-level import is still one)."""
    import ast

    package = os.path.join(ROOT, "bdiff")
    names = {f[:-3] for f in os.listdir(package) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in names:
        tree = ast.parse(open(os.path.join(package, f"{name}.py")).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "bdiff" and len(parts) > 1:
                    found.add(parts[1])
                elif node.module == "bdiff":
                    found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bdiff.")}
        graph[name] = (found & names) - {name}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])
