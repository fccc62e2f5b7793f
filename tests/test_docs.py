"""The documentation's examples run, and every public name has a reference entry with one.

- `test_example`: every ```python block of docs/**/*.md is one test. The blocks of a page run in
  order, as one script: in one namespace of their own (a block may use what the blocks above it
  on its page defined) and in a fresh temporary working directory (what an example writes,
  e.g. `runs/...`, lands there). Pages share nothing but this process's compiled JAX programs.
  A block whose fence line is preceded by the line `<!-- skip -->` is shown, not run. An
  example states its result with `assert`; the suite's warning filters (warnings are errors)
  and strict dtype promotion apply.
- `test_readme_library_example`: README.md's library example (slow, 20-50 s on 2 cores: run it
  with `--runslow`).
- `test_every_public_name_has_an_entry`: every public name of `PUBLIC_MODULES` (its `__all__`,
  or, for a module without one, what `dir()` lists less private names, modules and names
  imported from outside flowsim) has a `::: module.name` entry in docs/api/*.md, with a
  python block after it before the next entry or heading.
- `test_table_cells_are_short`: no table cell of docs/**/*.md has more than 40 words.
"""

import importlib
import inspect
import pathlib
import re
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

PUBLIC_MODULES = (
    "flowsim",
    "flowsim.models",
    "flowsim.losses",
    "flowsim.schedules",
    "flowsim.init",
    "flowsim.data",
    "flowsim.invariants",
    "flowsim.kinks",
    "flowsim.problems",
    "flowsim.sweep",
    "flowsim.reproduce",
)
NOT_API = {  # public-looking names that are helpers of the library itself
    "flowsim.kinks.warn_auto_smooth": "gradient_flow's warning (flowsim.kinks has no __all__)",
    "flowsim.kinks.resolve": "gradient_flow's choice of path (flowsim.kinks has no __all__)",
}
MAX_CELL_WORDS = 40

_FENCE = re.compile(r"^(`{3,})\s*python\s*$")
_ENTRY = re.compile(r"^::: +([\w.]+)\s*$")


def _blocks(path: pathlib.Path):
    """(first line number, source, skipped) of each ```python block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        skipped = i > 0 and lines[i - 1].strip() == "<!-- skip -->"
        start, i = i + 1, i + 1
        while i < len(lines) and lines[i].strip() != m.group(1):
            i += 1
        blocks.append((start + 1, "\n".join(lines[start:i]) + "\n", skipped))
        i += 1
    return blocks


def _example_ids():
    params = []
    for page in PAGES:
        rel = page.relative_to(DOCS).as_posix()
        for index, (line, _, skipped) in enumerate(_blocks(page)):
            marks = [pytest.mark.skip(reason="marked <!-- skip -->")] if skipped else []
            params.append(pytest.param(rel, index, id=f"{rel}:{line}", marks=marks))
    return params


class _Page:
    """One page's namespace and working directory, and how far its blocks have run."""

    def __init__(self, rel: str, workdir: pathlib.Path):
        self.blocks = _blocks(DOCS / rel)
        self.namespace: dict = {"__name__": f"docs:{rel}"}
        self.workdir = workdir
        self.done = 0


@pytest.fixture(scope="module")
def pages():
    return {}


@pytest.mark.parametrize("rel, index", _example_ids())
def test_example(rel, index, pages, tmp_path_factory, monkeypatch):
    if rel not in pages:
        pages[rel] = _Page(rel, tmp_path_factory.mktemp(rel.replace("/", "_")))
    page = pages[rel]
    monkeypatch.chdir(page.workdir)
    while page.done <= index:  # run the page's blocks up to this one, in order, once each
        line, source, skipped = page.blocks[page.done]
        page.done += 1
        if not skipped:  # compiled at its line of the page: tracebacks show the Markdown
            code = compile("\n" * (line - 1) + source, str(DOCS / rel), "exec")
            exec(code, page.namespace)


@pytest.mark.slow
def test_readme_library_example(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Library example", 1)[1]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "README.md (library example)", "exec"), {"__name__": "readme"})


def _public_names():
    names = {}
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        if hasattr(module, "__all__"):
            listed = list(module.__all__)
        else:
            listed = [
                n
                for n in dir(module)
                if not n.startswith("_")
                and not isinstance(getattr(module, n), types.ModuleType)
                and getattr(getattr(module, n), "__module__", "flowsim").startswith("flowsim")
            ]
        for name in listed:
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or f"{modname}.{name}" in NOT_API:
                continue
            names[f"{modname}.{name}"] = obj
    return names


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _entries():
    """{`:::` path: has a python block after it} over docs/api/*.md."""
    entries = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        current = None
        for line in page.read_text(encoding="utf-8").splitlines():
            m = _ENTRY.match(line)
            if m:
                current = m.group(1)
                entries[current] = False
            elif line.startswith("#"):
                current = None
            elif current is not None and _FENCE.match(line):
                entries[current] = True
                current = None
    return entries


def test_every_public_name_has_an_entry():
    entries = _entries()
    objects = {path: _resolve(path) for path in entries}  # every entry names a real object
    without_example = sorted(path for path, example in entries.items() if not example)
    assert not without_example, f"reference entries without an example below: {without_example}"
    by_identity = {
        id(obj) for obj in objects.values() if inspect.isclass(obj) or inspect.isfunction(obj)
    }
    missing = sorted(
        path
        for path, obj in _public_names().items()
        if path not in entries
        and not ((inspect.isclass(obj) or inspect.isfunction(obj)) and id(obj) in by_identity)
    )
    assert not missing, f"public names without a `:::` entry in docs/api/: {missing}"


def test_table_cells_are_short():
    long = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if not line.lstrip().startswith("|"):
                continue
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            long += [
                f"{page.relative_to(ROOT)}:{n}: {len(c.split())} words"
                for c in cells
                if len(c.split()) > MAX_CELL_WORDS
            ]
    assert not long, long


def test_pages_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [
        p.relative_to(DOCS).as_posix()
        for p in PAGES
        if f": {p.relative_to(DOCS).as_posix()}" not in nav
    ]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"
