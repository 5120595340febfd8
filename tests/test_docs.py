"""The examples in docs/ run as written (each page's ``python`` blocks, in order)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    """Return the ``python`` code blocks of a Markdown page, in order."""
    return _BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", ["workflows.md"])
def test_the_examples_of_a_page_run(page: str) -> None:
    blocks = python_blocks(DOCS / page)
    assert len(blocks) >= 5, f"{page}: expected its examples, found {len(blocks)} blocks"
    namespace: dict[str, object] = {"__name__": f"docs.{page}"}
    try:
        for number, block in enumerate(blocks, 1):
            code = compile(block, f"{page} block {number}", "exec")
            exec(code, namespace)
    finally:
        app = namespace.get("app")
        close = getattr(app, "close", None)
        if callable(close):
            close()
