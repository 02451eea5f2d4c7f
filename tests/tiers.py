"""The test tiers, a pytest plugin: a plain run is the fast tier.

Tests marked ``slow`` or ``end_to_end`` are deselected unless the command line picks
tests by marker (``-m slow``, ``-m end_to_end``, or any other ``-m`` expression) or names
them by node id (``tests/x.py::test_name``, ``tests/x.py::TestClass``): a test asked for
by name runs whatever its tier. A file or folder argument keeps the filter, so
``python -m pytest tests/end_to_end`` selects nothing without ``-m end_to_end``.

Deselecting here rather than with ``-m`` in ``addopts`` is what lets a node id through:
pytest applies ``-m`` to every test, named ones included.
"""

import os
from pathlib import Path
from typing import List

import pytest

TIERS = ("slow", "end_to_end")


def named_node_ids(config: pytest.Config) -> List[str]:
    """The command line's ``path::name`` arguments, as node ids (relative to the rootdir)."""
    named = []
    for argument in config.args:
        path, separator, names = argument.partition("::")
        if not separator:
            continue
        absolute = Path(os.path.abspath(config.invocation_params.dir / path))
        try:
            relative = absolute.relative_to(config.rootpath)
        except ValueError:
            continue
        named.append(f"{relative.as_posix()}::{names}")
    return named


def _is_named(node_id: str, named: List[str]) -> bool:
    # ``x.py::test_p`` names every parameter of test_p; ``x.py::Class`` every method of Class.
    return any(node_id == name or node_id.startswith((name + "::", name + "["))
               for name in named)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if config.option.markexpr:
        return
    named = named_node_ids(config)
    kept, deselected = [], []
    for item in items:
        in_a_tier = any(item.get_closest_marker(tier) for tier in TIERS)
        (deselected if in_a_tier and not _is_named(item.nodeid, named) else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
