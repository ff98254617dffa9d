"""The public surface: __all__, the API reference's source and the docstring skeleton agree."""

import importlib
import inspect
import re
from pathlib import Path

import hessfunc

API_DOCS = Path(__file__).parent.parent / "docs" / "api"


def api_reference_names():
    """Every entry of an ``autosummary`` list in docs/api/*.rst (one name a line)."""
    names = set()
    for page in sorted(API_DOCS.glob("*.rst")):
        in_list = False
        for line in page.read_text().splitlines():
            if line.startswith(".. autosummary::"):
                in_list = True
            elif in_list and line.strip() and not line.startswith(" "):
                in_list = False
            elif in_list and re.fullmatch(r"   [A-Za-z_][A-Za-z0-9_.]*", line):
                names.add(line.strip())
    return names


def test_every_public_name_is_in_the_api_reference():
    missing = set(hessfunc.__all__) - api_reference_names()
    assert not missing, f"add these to an autosummary list in docs/api/*.rst: {sorted(missing)}"


def test_every_api_reference_entry_exists():
    for name in api_reference_names():
        try:
            getattr(hessfunc, name)
        except AttributeError:
            importlib.import_module(f"hessfunc.{name}")  # a module imported on its own (testing)


def test_public_submodules_declare_their_names():
    # their pages document __all__ (automodule :members:): every name in it needs a docstring
    for name in hessfunc.__all__:
        obj = getattr(hessfunc, name)
        if inspect.ismodule(obj):
            assert obj.__doc__, f"hessfunc.{name}"
            for member in getattr(obj, "__all__", []):
                assert getattr(obj, member).__doc__, f"hessfunc.{name}.{member}"


def test_every_public_function_documents_returns_cost_and_example():
    for name in hessfunc.__all__:
        obj = getattr(hessfunc, name)
        if not inspect.isfunction(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        assert "Returns:" in doc, name
        assert "Example:" in doc, name
        if callable(obj) and name not in {"ravel"}:
            assert "Cost:" in doc, name


def test_public_signatures_are_annotated():
    for name in hessfunc.__all__:
        obj = getattr(hessfunc, name)
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, name


def test_importing_hessfunc_does_not_import_hypothesis():
    import subprocess
    import sys

    code = "import sys, hessfunc; print('hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
