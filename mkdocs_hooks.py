"""mkdocs hooks: complete the nav, and publish the repository's examples/ with the pages.

* Every page of docs/ that mkdocs.yml's nav does not list is added to a nav section:
  ``migration-*.md`` under "Migrating", ``optim-*.md`` under "Optimizers", any other under
  "Guides"; empty sections are dropped. New pages are thereby never left out of the site
  (which ``mkdocs build --strict`` would reject).
* The files of ``examples/`` (beside docs/) are copied into the site as ``examples/…``, and
  the pages' links to them (``../examples/x.py``, correct when reading docs/ on disk or on
  a forge) are pointed at those copies, so that they resolve in the site too.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

SECTIONS = {"migration-": "Migrating", "optim-": "Optimizers"}
OTHER = "Guides"


def on_config(config):
    """Append the unlisted pages to their sections of ``config["nav"]`` (called by mkdocs)."""
    docs = Path(config["docs_dir"])
    nav = config["nav"]
    listed = set(_pages(nav))
    excluded = {line.strip().lstrip("/") for line in str(config.get("exclude_docs") or "").splitlines()}
    for path in sorted(docs.rglob("*.md")):
        page = path.relative_to(docs).as_posix()
        if page in listed or page in excluded or page.startswith(("_", ".")):
            continue
        title = next((t for prefix, t in SECTIONS.items() if page.startswith(prefix)), OTHER)
        _section(nav, title).append(page)
    config["nav"] = [entry for entry in nav if not (isinstance(entry, dict) and list(entry.values()) == [[]])]
    return config


def _pages(nav):
    for entry in nav:
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, dict):
            for value in entry.values():
                yield from _pages(value) if isinstance(value, list) else [value]


def _section(nav, title):
    for entry in nav:
        if isinstance(entry, dict) and title in entry and isinstance(entry[title], list):
            return entry[title]
    nav.append({title: []})
    return nav[-1][title]


def on_files(files, config):
    """Add the files of ``examples/`` to the site as ``examples/<name>`` (called by mkdocs)."""
    examples = Path(config["docs_dir"]).parent / "examples"
    for path in sorted(examples.glob("*.py")) if examples.is_dir() else []:
        files.append(File.generated(config, f"examples/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Point links ``(../examples/…)`` (one level above the page) at the copies in the site."""
    depth = page.file.src_uri.count("/")
    return re.sub(
        r"\]\(" + re.escape("../" * (depth + 1)) + "examples/", "](" + "../" * depth + "examples/", markdown
    )
