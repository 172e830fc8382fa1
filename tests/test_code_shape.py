"""Shape of the library code: short functions (the house rule is at most 60 lines, docstring excluded)."""

from __future__ import annotations

import ast

from conftest import REPO

MAX_LINES = 60


def function_lengths(source: str) -> dict[str, int]:
    """``name@line`` -> lines of each function (decorators and signature included, docstring excluded)."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        lines = node.end_lineno - first + 1
        head = node.body[0]
        if isinstance(head, ast.Expr) and isinstance(head.value, ast.Constant) and isinstance(head.value.value, str):
            lines -= head.end_lineno - head.lineno + 1
        lengths[f"{node.name}@{node.lineno}"] = lines
    return lengths


def test_function_lengths_counts_without_the_docstring():
    source = (
        'def f(x):\n    """Doc\n\n    more.\n    """\n    y = x\n    return y\n\n\n@staticmethod\ndef g():\n    pass\n'
    )
    assert function_lengths(source) == {"f@1": 3, "g@11": 3}


def test_no_function_in_pipeline_is_longer_than_60_lines():
    long = {
        f"{path.relative_to(REPO)}:{name}": n
        for path in sorted((REPO / "pipeline").rglob("*.py"))
        for name, n in function_lengths(path.read_text()).items()
        if n > MAX_LINES
    }
    assert not long, f"functions over {MAX_LINES} lines (docstring excluded): {long}"
