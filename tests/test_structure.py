"""The shape of the training stack: family knowledge in the family files, no import circle, imports on top.

These read the source (``ast`` / ``tokenize``); nothing is run. Each names the file and line it objects to.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

from pgdpo.train.models import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pgdpo"
TRAIN = PACKAGE / "train"
FAMILY_FILES = PACKAGE / "train" / "models" / "families"

#: Packages a ``pgdpo[train]`` install may lack (pyproject's optional dependencies, the attention
#: backends, POSIX-only ``resource``): importing them inside the function that needs them keeps
#: ``import pgdpo.train`` working.
OPTIONAL = {"diffusers", "accelerate", "peft", "transformers", "safetensors", "yaml", "tqdm", "matplotlib",
            "tensorboard", "PIL", "flash_attn", "xformers", "wandb", "resource"}

#: Function-local imports of pgdpo/train that are not (yet) hoisted, by file: these counts may only
#: shrink. A file not named here has none.
NOT_YET_HOISTED: dict[str, int] = {}


def _python_files(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _family_words() -> set[str]:
    words = set()
    for family in FAMILIES:
        words.update({family.family, family.class_name})
    return words


def test_no_family_check_outside_the_family_files():
    """A literal naming a family (``"wan-i2v"``, ``"UNet3DConditionModel"``, or a start of one such as
    ``"wan"``) or an ``is_wan`` anywhere in pgdpo/ but the family files is a family check in the wrong room."""
    words = _family_words()
    found = []
    for path in _python_files(PACKAGE):
        if FAMILY_FILES in path.parents:
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.NAME and tok.string == "is_wan":
                found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: is_wan")
            elif tok.type == tokenize.STRING:
                try:
                    value = ast.literal_eval(tok.string)
                except (ValueError, SyntaxError):
                    continue  # an f-string
                if isinstance(value, str) and len(value) >= 3 and any(w.startswith(value) for w in words):
                    found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {value!r}")
    assert not found, "family checks outside pgdpo/train/models/families/:\n  " + "\n  ".join(found)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """pgdpo modules ``path`` imports when it is imported (module level, TYPE_CHECKING blocks aside)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    if sub in modules:
                        targets.add(sub)
                    elif module in modules:
                        targets.add(module)

    visit(ast.parse(path.read_text()).body)
    targets.discard(name)
    return targets


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_circle_in_the_training_stack():
    files = _python_files(TRAIN)
    modules = {_module_name(p) for p in _python_files(PACKAGE)}
    graph = {_module_name(p): {t for t in _top_level_imports(p, modules) if t.startswith("pgdpo.train")}
             for p in files}
    assert _circles(graph) == []


def test_the_circle_finder_sees_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _function_local_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import inside a function of ``path`` that is not of an optional package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            elif isinstance(inner, ast.ImportFrom):
                names = ["." * inner.level + (inner.module or "")]
            else:
                continue
            for name in names:
                if name.split(".")[0] not in OPTIONAL and name != "torch.utils.tensorboard":
                    found.append((inner.lineno, name))
    return sorted(set(found))


@pytest.mark.parametrize("path", _python_files(TRAIN), ids=lambda p: str(p.relative_to(TRAIN)))
def test_imports_are_on_top_but_for_optional_packages(path):
    """An import inside a function hides a dependency (or a circle); only optional packages may wait."""
    local = _function_local_imports(path)
    allowed = NOT_YET_HOISTED.get(str(path.relative_to(ROOT)), 0)
    where = "\n  ".join(f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in local)
    assert len(local) <= allowed, f"imports inside functions (hoist them to the top):\n  {where}"
