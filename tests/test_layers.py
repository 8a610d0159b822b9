"""The layout's promises, checked on the source: imports point down the floors, never up, and the
API process never loads the engine runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, STORE_DB, redis_url

# Top to bottom (README "How it works"). A module may import its own floor and those below it.
FLOORS = ("genqueue", "api", "tasks.runtime", "tasks", "tasks.store", "engine", "config")
# What each floor must never import, whatever the floors say: the engine is no web or queue code.
FORBIDDEN = {"engine": ("flask", "celery", "kombu", "redis", "werkzeug", "marshmallow"), "config": ("genqueue",)}


def floor(module: str) -> int | None:
    matches = [i for i, name in enumerate(FLOORS) if module == name or module.startswith(name + ".")]
    return max(matches, key=lambda i: len(FLOORS[i])) if matches else None


def imports(path: Path) -> set[str]:
    """Every absolute import of a module, at any depth (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules() -> list[tuple[str, Path]]:
    found = []
    for top in ("genqueue", "api", "tasks", "engine", "config"):
        for path in sorted((REPO / top).rglob("*.py")):
            found.append((".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"), path))
    return found


@pytest.mark.parametrize("module, path", modules(), ids=[module for module, _ in modules()])
def test_imports_point_down_the_floors(module, path):
    own = floor(module)
    assert own is not None, f"{module} is on no floor"
    for imported in imports(path):
        target = floor(imported)
        assert target is None or target >= own, f"{module} (floor {FLOORS[own]}) imports {imported} from above"
        for name in FORBIDDEN.get(FLOORS[own], ()):
            assert imported != name and not imported.startswith(name + "."), f"{module} imports {imported}"


def test_the_api_process_never_loads_the_engine_runtime():
    code = (
        "import sys, api\n"
        f"app = api.create_app({{'REDIS_URL': {redis_url(STORE_DB)!r}}})\n"
        "app.test_client().get('/openapi.json'); app.test_client().get('/')\n"
        "loaded = sorted(m for m in ('ctranslate2', 'torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
