"""Every ```python block of the documentation's pages (docs/**/*.md) and of README.md runs.

The blocks of one page run in order in one namespace, as a reader would paste them into one
session, so a later block may use what an earlier one defined. A page with no ```python block
passes. To show code that must not run (a shell command, an excerpt), fence it as ```bash or
```text. A new guide is picked up with no change here.
"""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
PAGES = sorted(
    p for p in (ROOT / "docs").rglob("*.md") if not {"_build", "notebooks"} & set(p.parts)
) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text):
    """(line number, source) of every ```python block."""
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_extractor_finds_blocks_and_skips_other_fences():
    text = "# t\n```python\nx = 1\n```\n```bash\nexit 1\n```\n```python\ny = x + 1\n```\n"
    assert [src for _, src in python_blocks(text)] == ["x = 1\n", "y = x + 1\n"]
    assert python_blocks("# a guide with no example\n") == []


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_examples_run(page):
    # as in a fresh session: torch's own default dtype (tests/conftest.py sets float64)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    # a real module: torch.compile looks functions' globals up by their module's name
    module = types.ModuleType(f"docs_example_{page.stem}")
    sys.modules[module.__name__] = module
    try:
        for line, source in python_blocks(page.read_text()):
            code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
            exec(code, module.__dict__)  # noqa: S102 - the documentation's own examples
    finally:
        torch.set_default_dtype(saved)
        del sys.modules[module.__name__]
