"""The floors of the house, as a test: which package may import which (every import counts, including
those inside functions and under ``TYPE_CHECKING``). The rules are the design's (DESIGN.md §2):

- the control plane (``wrenbox.manager``) reaches the host only through the runtime seam
  (``wrenbox.runtime.base``), never the parts below it;
- a VMM driver knows nothing of network slots, templates or the layers above;
- settings flow one way: only the composition root (``service``) and the entry points (``cli``,
  ``demo``, ``localserver``) read ``wrenbox.config``; every package below takes its own config object;
- the guest agent imports only itself, the errors and the protocol code (it runs in every sandbox);
- the coming API server (``wrenbox.api``) uses the manager's face and nothing of the host;
- nothing imports the composition root or the entry points, except the entry points.

``test_each_rule_catches_a_breach`` checks the checker: a package breaking each rule once is caught.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

HOST_PARTS = (
    "wrenbox.vmm",
    "wrenbox.rootfs",
    "wrenbox.network",
    "wrenbox.templates",
    "wrenbox.launch",
    "wrenbox.memory",
    "wrenbox.images",
    "wrenbox.probe",
)
# ``localserver`` starts and finds ``wrenbox serve`` processes for the demo: an entry point's helper.
TOP = ("wrenbox.service", "wrenbox.cli", "wrenbox.demo", "wrenbox.localserver")


@dataclass(frozen=True)
class Rule:
    name: str
    importers: tuple[str, ...]  # modules (and their submodules) the rule applies to
    forbidden: tuple[str, ...] = ()  # ... may not import these (or their submodules)
    only: tuple[str, ...] | None = None  # ... may import nothing of wrenbox but these
    allowed: tuple[str, ...] = ()  # exceptions to ``forbidden``
    exempt: tuple[str, ...] = ()  # importers the rule does not apply to


RULES = (
    Rule(
        "the manager reaches the host only through the runtime seam",
        importers=("wrenbox.manager",),
        forbidden=(*HOST_PARTS, "wrenbox.runtime", "wrenbox.config", "wrenbox.api", *TOP),
        allowed=("wrenbox.runtime.base",),
    ),
    Rule(
        "a VMM driver knows nothing of slots, templates or the floors above",
        importers=("wrenbox.vmm",),
        forbidden=(
            "wrenbox.network",
            "wrenbox.templates",
            "wrenbox.launch",
            "wrenbox.runtime",
            "wrenbox.manager",
            "wrenbox.images",
            "wrenbox.rootfs",
        ),
    ),
    Rule(
        "only the composition root and the entry points read the settings",
        importers=("wrenbox",),
        forbidden=("wrenbox.config",),
        exempt=("wrenbox.config", *TOP),
    ),
    Rule(
        "the guest agent imports only itself, the errors and the protocol code",
        importers=("wrenbox.guest",),
        only=("wrenbox.guest", "wrenbox.errors", "wrenbox.proto"),
    ),
    Rule(
        "the API uses the manager's face, nothing of the host",
        importers=("wrenbox.api",),
        forbidden=(
            *HOST_PARTS,
            "wrenbox.runtime",
            "wrenbox.manager.store",
            "wrenbox.manager.catalog",
            "wrenbox.manager.recovery",
        ),
    ),
    Rule(
        "nothing imports the composition root or the entry points",
        importers=("wrenbox",),
        forbidden=TOP,
        exempt=TOP,
    ),
)


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every wrenbox module ``path`` imports, anywhere in it (``from a import b`` also counts ``a.b``
    when ``b`` is a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                as_path = root.joinpath(*candidate.split("."))
                if as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists():
                    found.add(candidate)
    return {m for m in found if m == "wrenbox" or m.startswith("wrenbox.")}


def breaches(root: Path, rules: tuple[Rule, ...] = RULES) -> list[str]:
    out = []
    for path in sorted((root / "wrenbox").rglob("*.py")):
        importer = module_name(path, root)
        for target in sorted(imports_of(path, root)):
            for rule in rules:
                if not under(importer, rule.importers) or under(importer, rule.exempt):
                    continue
                if rule.only is not None:
                    broken = target != "wrenbox" and not under(target, rule.only)
                else:
                    broken = under(target, rule.forbidden) and not under(target, rule.allowed)
                if broken:
                    out.append(f"{importer} imports {target}: breaks '{rule.name}'")
    return out


def test_the_source_keeps_every_rule() -> None:
    assert breaches(SRC) == []


def test_the_checker_sees_the_real_imports() -> None:
    """A checker that found nothing would pass the test above: it must see the arrows that exist."""
    manager = imports_of(SRC / "wrenbox" / "manager" / "manager.py", SRC)
    assert {"wrenbox.runtime.base", "wrenbox.manager.catalog", "wrenbox.records"} <= manager
    assert "wrenbox.config" in imports_of(SRC / "wrenbox" / "service.py", SRC)
    assert "wrenbox.vmm.base" in imports_of(SRC / "wrenbox" / "launch.py", SRC)


BREACHES = {
    "wrenbox/manager/bad.py": "from wrenbox.vmm.qemu import QemuDriver\n",
    "wrenbox/manager/also_bad.py": "from ..runtime import host\n",  # relative, and a module by name
    "wrenbox/vmm/bad.py": "def f():\n    from wrenbox.network.plan import TAP\n",  # inside a function
    "wrenbox/rootfs/bad.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wrenbox.config import Settings\n"
    ),
    "wrenbox/guest/bad.py": "import wrenbox.envd\n",
    "wrenbox/api/bad.py": "from wrenbox import templates\n",
    "wrenbox/network/bad.py": "from wrenbox import service\n",
}
FINE = {
    "wrenbox/manager/good.py": (
        "from wrenbox.runtime.base import Runtime\nfrom wrenbox.records import SandboxRecord\n"
    ),
    "wrenbox/api/good.py": "from wrenbox.manager import Sandboxes\n",
    "wrenbox/cli.py": "from wrenbox.config import Settings\nfrom wrenbox import service\n",
    "wrenbox/guest/good.py": "from wrenbox.errors import NotFound\nfrom wrenbox.proto import process\n",
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_each_rule_catches_a_breach(tmp_path: Path, breach: str) -> None:
    tree = {**FINE, breach: BREACHES[breach]}
    for relative, source in tree.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for package in ("wrenbox", "wrenbox/manager", "wrenbox/runtime", "wrenbox/vmm", "wrenbox/network"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    for module in ("wrenbox/runtime/host.py", "wrenbox/templates/__init__.py", "wrenbox/service.py"):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).touch()
    found = breaches(tmp_path)
    importer = module_name(tmp_path / breach, tmp_path)
    assert found, f"{breach} broke a rule unnoticed"
    assert all(line.startswith(f"{importer} imports ") for line in found), found  # and nothing else
