"""scripts/constraints.txt, the versions scripts/setup.sh installs, against setup.py's requirements."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# Installed by setup.sh itself (CPU) or kept from the user's install (GPU): never constrained.
UNCONSTRAINED = {"torch", "triton"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _setup_requirements() -> list[Requirement]:
    """INSTALL_REQUIRES and the extras setup.sh installs by default (dev, dense), read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = node.value
    reqs = ast.literal_eval(values["INSTALL_REQUIRES"])
    extras = ast.literal_eval(values["EXTRAS"])
    default_extras = re.search(
        r"EXTRAS=\$\{EXTRAS:-([\w,]+)\}", (REPO / "scripts/setup.sh").read_text()
    ).group(1)
    for extra in default_extras.split(","):
        reqs += extras[extra]
    return [Requirement(r) for r in reqs]


def _constraints() -> dict[str, list[Version]]:
    """Every pin per package: one, or one per environment marker."""
    pins: dict[str, list[Version]] = {}
    markers: dict[str, list[str]] = {}
    for n, line in enumerate((REPO / "scripts/constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt line {n} is not 'name==version': {line!r}"
        )
        name = _norm(req.name)
        marker = str(req.marker) if req.marker else ""
        seen = markers.get(name, [])
        assert not seen or (marker and "" not in seen and marker not in seen), (
            f"constraints.txt pins {name} twice for the same environments (line {n})"
        )
        markers.setdefault(name, []).append(marker)
        pins.setdefault(name, []).append(Version(specs[0].version))
    return pins


def test_every_direct_dependency_is_pinned_within_its_range():
    pins = _constraints()
    missing, outside = [], []
    for req in _setup_requirements():
        name = _norm(req.name)
        if name in UNCONSTRAINED:
            continue
        if name not in pins:
            missing.append(name)
        else:
            outside += [
                f"{name}=={v} (setup.py: {req.specifier})"
                for v in pins[name]
                if not req.specifier.contains(v, prereleases=True)
            ]
    assert not missing, f"setup.py requirements without a pin in scripts/constraints.txt: {missing}"
    assert not outside, f"pins outside setup.py's ranges: {outside}"


def test_the_running_python_gets_one_megatron_core():
    # The markers split the pins by Python version; exactly one applies to any interpreter.
    lines = [
        Requirement(x)
        for x in (REPO / "scripts/constraints.txt").read_text().splitlines()
        if x.strip().startswith("megatron-core")
    ]
    for py in ("3.10", "3.11", "3.12", "3.13"):
        env = {"python_version": py, "python_full_version": py + ".0"}
        assert sum(1 for r in lines if r.marker is None or r.marker.evaluate(env)) == 1, py


def test_torch_triton_and_cuda_packages_are_not_constrained():
    # A pin on torch or triton would fight a GPU user's CUDA torch (which pins its own triton).
    pins = _constraints()
    assert not UNCONSTRAINED & set(pins)
    assert not [n for n in pins if n.startswith("nvidia-")]


def test_setup_installs_the_cpu_triton_it_documents():
    # setup.sh installs triton next to the CPU torch: the kernel tests' interpreter is version-sensitive.
    text = (REPO / "scripts/setup.sh").read_text()
    cpu = re.search(r'CPU_TORCH="([^"]+)"', text).group(1).split()
    assert [Requirement(r).name for r in cpu] == ["torch", "triton"]
    assert all(str(Requirement(r).specifier).startswith("==") for r in cpu)
