"""The house: the import map of vibevoice_pool/ and workers/ (docs/ARCHITECTURE.md).

Read from the source (every import, those inside functions too), so a lazy
import cannot hide a circle or an arrow that runs back up.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vibevoice_pool", "workers")
ROUTES = ("app", "openai", "voices", "jobs", "scaling")  # api/ modules that declare routes


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_map() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert circles(import_map()) == []


def test_no_module_over_500_lines():
    files = {n: p for n, p in modules().items()}
    files |= {p.relative_to(ROOT).as_posix(): p for p in (ROOT / "bench").rglob("*.py")}
    long = {n: len(p.read_text().splitlines()) for n, p in files.items()}
    assert {n: k for n, k in long.items() if k > 500} == {}


# standalone scripts for a GPU machine, run as `python bench/<name>.py` (gpu_all.py runs
# the others); everything else in bench/ is the package
GPU_SCRIPTS = ("bench_gpu_1p5b.py", "gpu_respawn.py", "gpu_pool.py", "gpu_all.py")


def test_the_benchmarks_are_a_package_that_edits_no_import_path():
    bench = ROOT / "bench"
    for folder in [bench, *(p for p in bench.iterdir() if p.is_dir() and p.name != "__pycache__")]:
        assert (folder / "__init__.py").exists(), folder
    sections = sorted(p.parent.name for p in bench.glob("*/run.py"))
    assert sections == sorted(p.parent.name for p in bench.glob("*/record.py"))
    assert len(sections) >= 5, sections
    edits = [
        p.relative_to(ROOT).as_posix()
        for p in bench.rglob("*.py")
        if p.name not in GPU_SCRIPTS
        and re.search(r"sys\.path\s*(\[|\.insert|\.append|=)", p.read_text())
    ]
    assert edits == []


def test_at_most_a_dozen_modules_at_the_top():
    top = sorted(p.name for p in (ROOT / "vibevoice_pool").glob("*.py"))
    assert len(top) <= 12, top


def test_workers_is_shaped_in_sub_packages():
    top = sorted(p.name for p in (ROOT / "workers").glob("*.py"))
    assert len(top) <= 6, top
    folders = sorted(p.name for p in (ROOT / "workers").iterdir() if (p / "__init__.py").exists())
    assert folders == ["checkpoints", "engines", "host", "wire", "zygote"]


# what each workers/ sub-package may import of workers/ (itself always)
WORKER_ARROWS = {
    "workers.wire": set(),  # the contract both sides read stands alone
    "workers.engines": {"workers.wire", "workers.checkpoints"},  # never a host
    "workers.checkpoints": {"workers.wire"},
    "workers.host": {"workers.wire", "workers.engines"},
    "workers.zygote": {"workers.wire", "workers.engines", "workers.host", "workers.checkpoints"},
}


def _part(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_worker_parts_import_only_what_they_build_on():
    wrong = []
    for name, deps in import_map().items():
        if not name.startswith("workers."):
            continue
        allowed = WORKER_ARROWS[_part(name)] | {_part(name), "workers"}
        wrong += [(name, d) for d in deps if d.startswith("workers") and _part(d) not in allowed]
    assert wrong == []


def test_an_engine_never_imports_another_engine_but_through_the_factory():
    graph = import_map()
    sim, vv = "workers.engines.sim", "workers.engines.vibevoice"
    wrong = [
        (n, d) for n, ds in graph.items() for d in ds if n.startswith(sim) and d.startswith(vv)
    ]
    wrong += [
        (n, d) for n, ds in graph.items() for d in ds if n.startswith(vv) and d.startswith(sim)
    ]
    wrong += [
        (n, d)
        for n, ds in graph.items()
        for d in ds
        if d == "workers.engines.factory"
        and n.startswith("workers.engines")
        and n != "workers.engines.factory"
    ]
    assert wrong == []


def test_arrows_run_one_way():
    graph = import_map()
    wrong = []
    for name, deps in graph.items():
        for dep in deps:
            if name.startswith("workers") and dep.startswith("vibevoice_pool"):
                wrong.append((name, dep))  # a worker never loads the parent
            if name.startswith("vibevoice_pool.pool") and dep.startswith(
                ("vibevoice_pool.api", "vibevoice_pool.ui", "vibevoice_pool.jobs")
            ):
                wrong.append((name, dep))  # the pool knows no front end
            if name.startswith("vibevoice_pool.ui") and dep in {
                f"vibevoice_pool.api.{r}" for r in ROUTES
            }:
                wrong.append((name, dep))  # the page imports no HTTP route module
            if name.startswith(("vibevoice_pool.api", "vibevoice_pool.jobs")) and dep.startswith(
                "vibevoice_pool.ui"
            ):
                wrong.append((name, dep))
    assert wrong == []


def test_route_modules_do_not_import_one_another():
    graph = import_map()
    routes = {f"vibevoice_pool.api.{r}" for r in ROUTES}
    assembler = "vibevoice_pool.api.app"  # builds every router into one app
    wrong = [(n, d) for n in routes - {assembler} for d in graph[n] if d in routes]
    assert wrong == []


def test_the_architecture_page_names_every_sub_package_and_the_readme_links_it():
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    packages = sorted(
        p.parent.relative_to(ROOT).as_posix() + "/"
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("__init__.py")
    )
    assert "vibevoice_pool/pool/" in packages and "workers/" in packages
    assert [p for p in packages if f"`{p}`" not in page and f"\n{p}" not in page] == []
    assert "(docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_architecture_page_names_every_module_where_it_lives():
    """Each sub-package's modules in its row's last column, the top-level modules of
    vibevoice_pool/ and bench/ in the map of the parts: a module added without its
    line on the page (jobs/places.py, bench/full_size.py were) is found here."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = {}
    for line in page.splitlines():
        row = re.match(r"\| `([\w/]+/)` \|.*\|([^|]*)\|$", line)
        if row:
            rows[row.group(1)] = row.group(2)
    parts = page[: page.index("| Sub-package |")]
    missing = []
    for pkg in (*PACKAGES, "bench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "__init__.py":
                continue
            folder = path.parent.relative_to(ROOT).as_posix() + "/"
            if folder in rows:
                named = f"`{path.name}`" in rows[folder]
            elif path.parent in (ROOT / "vibevoice_pool", ROOT / "bench"):
                named = re.search(rf"(^|\s){re.escape(path.name)}(\s|$)", parts, re.M)
            else:
                continue  # bench's sections: one package each, run.py and record.py
            if not named:
                missing.append(path.relative_to(ROOT).as_posix())
    assert "vibevoice_pool/pool/" in rows and "workers/wire/" in rows
    assert missing == []
