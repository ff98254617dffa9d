"""Sphinx configuration of hessfunc's documentation site.

Build (warnings are errors, broken cross-references included)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html

Sphinx rather than MkDocs: autodoc and napoleon read the Google-style docstrings as they are,
``:math:`` roles included, with ``-n`` checking every cross-reference; MyST-NB executes and
renders the notebooks inside the same build; and its search index and the MathJax copy of
``sphinx-mathjax-offline`` work from a plain file server with no network.

The site needs no network, neither to build nor to read: MathJax comes from the
``sphinx-mathjax-offline`` package, search is Sphinx's own index, and the notebooks are executed
here, at build time.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
# the notebooks' kernels are other processes: they import this checkout's hessfunc too
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import hessfunc  # noqa: E402

project = "hessfunc"
author = "hessfunc contributors"
copyright = "hessfunc contributors"
release = version = hessfunc.__version__

extensions = [
    "myst_nb",  # Markdown (MyST) pages and executed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # ships MathJax into _static: math renders with no network
    "nb_gallery",  # docs/_ext/nb_gallery.py: the gallery's cards
]

# -- sources ----------------------------------------------------------------------------------
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The notebooks live in notebooks/ at the top of the repository (tests/test_notebooks.py runs
# them there). Copy every one into the gallery's source folder, so a new notebook needs no
# configuration; copy2 keeps the modification time, so unchanged notebooks are not rebuilt.
_GALLERY = DOCS / "gallery" / "notebooks"
_GALLERY.mkdir(parents=True, exist_ok=True)
_wanted = {p.name for p in (ROOT / "notebooks").glob("*.ipynb")}
for _old in _GALLERY.glob("*.ipynb"):
    if _old.name not in _wanted:
        _old.unlink()
for _name in sorted(_wanted):
    _src, _dst = ROOT / "notebooks" / _name, _GALLERY / _name
    if not _dst.exists() or _dst.stat().st_mtime != _src.stat().st_mtime:
        shutil.copy2(_src, _dst)

# -- notebooks: executed at build time (they are stored without outputs) -----------------------
nb_execution_mode = os.environ.get("HESSFUNC_DOCS_EXECUTE", "cache")
nb_execution_timeout = 900
nb_execution_raise_on_error = True  # a failing notebook fails the build
nb_execution_show_tb = True
nb_merge_streams = True
nb_execution_excludepatterns: list[str] = []

# -- API reference ----------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Cost", "notes_style")]
napoleon_use_ivar = True  # NamedTuple fields are documented once, by :members:
add_module_names = False

# Broken cross-references are errors (-n). Names outside hessfunc (torch, optree, typing,
# scipy) have no inventory without network access, so only hessfunc's own are checked.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!hessfunc\b).*"),
]

# -- HTML -------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"hessfunc {release}"
html_static_path = ["_static"]
html_css_files = ["gallery.css"]
html_show_sourcelink = False


# -- cross-references to where an object is defined -------------------------------------------
# Docstrings and annotations name objects where they are defined (``hessfunc.products.fd.fd_grad``,
# ``hessfunc.kron._layers.Layout``); the reference documents them where users import them
# (``hessfunc.fd_grad``). Point such a reference at the public name. A target that exists in the
# code but is not public (a private class in an annotation, an internal module) is shown as text;
# a target that does not exist at all stays a broken reference, so -n still fails on typos.
import importlib  # noqa: E402

from sphinx.addnodes import pending_xref  # noqa: E402

_PUBLIC_MODULES = ("hessfunc",) + tuple(
    f"hessfunc.{n}" for n in hessfunc.__all__ if type(getattr(hessfunc, n)).__name__ == "module"
)


def _exists(target: str) -> bool:
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _public_name(env, target: str) -> str | None:
    name = target.split(".")[-1]
    rest = target.split(".")[-2:] if "." in target else [target]
    domain = env.get_domain("py")
    for mod in _PUBLIC_MODULES:
        for cand in (f"{mod}.{name}", f"{mod}.{'.'.join(rest)}"):
            if cand in domain.objects:
                return cand
    return None


def _resolve_to_public(app, env, node: pending_xref, contnode):
    if node.get("refdomain") != "py" or not node["reftarget"].startswith("hessfunc."):
        return None
    public = _public_name(env, node["reftarget"])
    if public is None or public == node["reftarget"]:
        return None
    objtype = env.get_domain("py").objects[public].objtype
    return env.get_domain("py").resolve_xref(
        env,
        node["refdoc"],
        app.builder,
        objtype if objtype != "module" else "mod",
        public,
        node,
        contnode,
    )


def _quiet_if_not_public(app, domain, node) -> bool | None:
    target = node.get("reftarget", "")
    if node.get("refdomain") == "py" and target.startswith("hessfunc.") and _exists(target):
        return True  # defined in hessfunc, deliberately not in the public reference
    return None


def setup(app):
    """Send references to public names, and quiet those to non-public objects."""
    app.connect("missing-reference", _resolve_to_public)
    app.connect("warn-missing-reference", _quiet_if_not_public)
