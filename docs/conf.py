"""Sphinx configuration of the histoprism documentation site (``make docs``).

The pages are the Markdown files of ``docs/`` (MyST), so that they read the same on GitHub and
on the site; tutorials are MyST notebooks executed at every build (myst-nb), so that each figure
is what this version of the package draws.
"""

from __future__ import annotations

import os

from histoprism import __version__

project = "histoprism"
author = "the histoprism developers"
copyright = "2026, the histoprism developers (Apache-2.0)"  # noqa: A001 (Sphinx's name)
release = version = __version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
root_doc = "index"

# Markdown: GitHub-style heading anchors, so that links such as cli.md#histoprism-train work on
# GitHub and on the site alike
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence", "dollarmath"]
# Links that leave docs/ (the README, benchmarks/README.md) have no page on the site; every
# Markdown link, those included, is checked against the files and their headings by
# tests/test_docs.py instead
suppress_warnings = ["myst.xref_missing"]

# Tutorials run top to bottom at each build; an error fails the build
# (HISTOPRISM_DOCS_EXECUTE=off builds the pages without running them, for quick edits)
nb_execution_mode = os.environ.get("HISTOPRISM_DOCS_EXECUTE", "force")
nb_execution_timeout = 300  # seconds per cell
nb_execution_raise_on_error = True
nb_merge_streams = True
# warnings that third-party imports print (tqdm, docrep) are not part of the lesson
nb_output_stderr = "remove"

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_numpy_docstring = True

html_theme = "sphinx_book_theme"
html_title = f"histoprism {__version__}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
