"""The package's structure: runtime code only in its backend, no import cycles, one backend interface."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import actsparse
from actsparse import ActSparseError
from actsparse.backends import FORMATS, WEIGHT_FORMATS, Backend, get_backend

ROOT = Path(actsparse.__file__).parent
RUNTIMES = {"openvino", "openvino_genai", "onnx", "onnxruntime", "onnx_ir", "optimum", "nncf"}
NEUTRAL = ["actsparse", "actsparse.backends", "actsparse.benchmark", "actsparse.calibration.error",
           "actsparse.calibration.plan", "actsparse.calibration.stats", "actsparse.calibration.targets",
           "actsparse.calibration.text", "actsparse.cli", "actsparse.demo", "actsparse.evaluation",
           "actsparse.exports.models", "actsparse.pipeline", "actsparse.runtime_ext", "actsparse.serve"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, in_functions: bool) -> set[str]:
    """Modules ``name`` imports at module level (or, with ``in_functions``, inside functions), resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree, found = ast.parse(path.read_text()), set()

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and inner == in_functions:
                if isinstance(child, ast.Import):
                    found.update(alias.name for alias in child.names)
                else:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{base}.{child.module}" if child.level and child.module else (child.module or base)
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in child.names)  # ``from . import x``
            visit(child, inner)
    visit(tree, False)
    return found


def test_neutral_modules_never_import_a_runtime():
    modules = _modules()
    for name in NEUTRAL:
        imported = _imports(name, modules[name], False) | _imports(name, modules[name], True)
        assert not {m.split(".")[0] for m in imported} & RUNTIMES, f"{name} imports a runtime"


def test_each_runtime_is_imported_by_its_backend_only():
    owner = {"openvino": "actsparse.backends.openvino", "openvino_genai": "actsparse.backends.openvino",
             "onnx": "actsparse.backends.onnx",
             "onnxruntime": "actsparse.backends.onnx"}
    for name, path in _modules().items():
        imported = {m.split(".")[0] for m in _imports(name, path, False) | _imports(name, path, True)}
        for runtime in imported & set(owner):
            assert name.startswith(owner[runtime]), f"{name} imports {runtime}"


def test_actsparse_modules_import_each_other_at_module_level_without_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, False) if m in modules and m != name}
             for name, path in modules.items()}
    for name, path in modules.items():
        inner = {m for m in _imports(name, path, True) if m.split(".")[0] == "actsparse"}
        assert not inner, f"{name} imports {sorted(inner)} inside a function"
    state: dict[str, int] = {}

    def visit(name, stack):
        state[name] = 1
        for dep in graph[name]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack + [name, dep])}"
            if dep not in state:
                visit(dep, stack + [name])
        state[name] = 2
    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_onnx_path_loads_no_openvino():
    code = ("import sys, actsparse.cli, actsparse.backends as b; b.get_backend('onnx'); "
            "print(sorted(m for m in ('openvino', 'nncf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", list(FORMATS))
def test_get_backend_by_name_and_by_output_folder(tmp_path, name):
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.format is FORMATS[name]
    assert set(backend.capabilities.weight_formats) <= set(WEIGHT_FORMATS)
    (tmp_path / FORMATS[name].model_file).write_text("")
    assert get_backend(tmp_path) is backend
    assert get_backend(str(tmp_path)) is backend


def test_get_backend_refuses_what_it_does_not_know(tmp_path):
    with pytest.raises(ActSparseError, match="unknown format 'tflite'"):
        get_backend("tflite")
    with pytest.raises(ActSparseError, match="holds no model"):
        get_backend(tmp_path)
    with pytest.raises(ActSparseError, match="is not a folder"):
        get_backend(tmp_path / "missing")


def test_capabilities_say_what_each_backend_lacks():
    openvino, onnx = get_backend("openvino").capabilities, get_backend("onnx").capabilities
    assert openvino.model_error_probes and openvino.cats
    assert not onnx.model_error_probes and not onnx.cats
    assert onnx.weight_formats == ("fp32", "int8")
    with pytest.raises(ActSparseError, match="cats is not available with --format onnx"):
        get_backend("onnx").cats_sources(None, [])


def test_every_benchmark_script_starts():
    """Each benchmark's --help runs its imports: a name the package no longer has fails here, not on a user."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    scripts = sorted(p for p in folder.glob("*.py") if not p.name.startswith("_") and p.name != "report.py")
    assert len(scripts) >= 8
    for script in scripts:
        proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=folder,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), f"{script.name}: {proc.stderr[-500:]}"
