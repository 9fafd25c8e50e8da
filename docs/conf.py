"""Sphinx configuration: MyST Markdown pages, the furo theme, autodoc of the public API.

Build with warnings as errors: ``nox -s docs``, or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import trio_pgs

project = "trio-pgs"
author = "trio-pgs maintainers"
copyright = "trio-pgs maintainers"
release = trio_pgs.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
# perf-table.md is written by `benchmarks/run.py --markdown docs/perf-table.md`: an
# output, not a page.
exclude_patterns = ["_build", "perf-table.md", "Thumbs.db", ".DS_Store"]

# Docstrings write names in single backticks (`handle_call`, `trio.fail_after`):
# show them as code rather than guessing a cross-reference target.
default_role = "code"

# MyST: make "page.md#some-heading" links resolve to headings down to level 3.
myst_heading_anchors = 3

# autodoc: document what the docstrings say, in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"trio-pgs {release}"
