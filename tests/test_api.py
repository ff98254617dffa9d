"""The public surface: __all__, the README's API table and the docstring skeleton agree."""

import inspect
import re
from pathlib import Path

import hessfunc

README = (Path(__file__).parent.parent / "README.md").read_text()


def readme_api_names():
    section = README.split("## API", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([A-Za-z_]+)[(`]", section, re.M)}


def test_all_matches_the_readme_table():
    assert set(hessfunc.__all__) == readme_api_names()


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
