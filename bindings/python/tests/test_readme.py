"""The README's Python examples are valid Python of the package's API."""

from __future__ import annotations

import ast
import re

from conftest import REPOSITORY

import portferry


def python_blocks() -> list[str]:
    readme = (REPOSITORY / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", readme, flags=re.MULTILINE | re.DOTALL)


def test_every_python_example_compiles_and_names_only_the_packages_api() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 7, "the README's Python examples are gone"
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "portferry"
            ):
                assert node.attr in portferry.__all__, f"portferry.{node.attr} in:\n{block}"
