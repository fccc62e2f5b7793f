"""mkdocs hook: publish the repository files that the pages link to outside docs/.

A page links to data where it sits in the repository (`../benchmarks/results/overhead.json`
from docs/benchmarks.md), so the link also works where the Markdown is read as it is (GitHub,
an editor). mkdocs only publishes docs/, and `--strict` fails on such a link; this hook
publishes each linked file at its repository path in the site (`benchmarks/results/...`) and
points the link there. A link to a file that does not exist is left alone, so the strict build
still fails on it.
"""

import os
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

_LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")
_published: dict[Path, str] = {}  # absolute path of a linked repository file -> its site path


def _outside_target(page_path: Path, link: str, docs: Path, root: Path) -> Path | None:
    """The repository file outside docs/ that `link` on page `page_path` points to, or None."""
    if "://" in link or link.startswith(("/", "mailto:")):
        return None
    target = (page_path.parent / link).resolve()
    if target.is_relative_to(docs) or not target.is_relative_to(root) or not target.is_file():
        return None
    if target.suffix == ".md":  # a page of its own, not data: link it on the site instead
        return None
    return target


def on_files(files, config):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    _published.clear()
    for page in sorted(docs.rglob("*.md")):
        for match in _LINK.finditer(page.read_text(encoding="utf-8")):
            target = _outside_target(page, match.group(1), docs, root)
            if target is not None and target not in _published:
                src_uri = target.relative_to(root).as_posix()
                _published[target] = src_uri
                files.append(File.generated(config, src_uri, abs_src_path=str(target)))
    return files


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    page_path = Path(page.file.abs_src_path)

    def rewrite(match):
        target = _outside_target(page_path, match.group(1), docs, root)
        if target is None or target not in _published:
            return match.group(0)
        here = posixpath.dirname(page.file.src_uri)
        new = posixpath.relpath(_published[target], here or os.curdir)
        return f"]({new}{match.group(2) or ''})"

    return _LINK.sub(rewrite, markdown)
