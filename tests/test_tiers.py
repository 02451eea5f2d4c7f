"""Which tests a command line selects: the fast tier by default, a tier by ``-m``, any test by
its node id. Run on a tiny suite in a scratch folder under the repository's own pytest
settings and tier plugin (``tests/tiers.py``), without this suite's TensorFlow set-up."""

import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

TINY_SUITE = '''
import pytest

def test_fast():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.end_to_end
@pytest.mark.parametrize("n", [1, 2])
def test_processes(n):
    pass
'''
FAST = ["tests/test_tiny.py::test_fast"]
SLOW = ["tests/test_tiny.py::test_slow"]
END_TO_END = ["tests/test_tiny.py::test_processes[1]", "tests/test_tiny.py::test_processes[2]"]


@pytest.fixture
def run_pytest(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_tiny.py").write_text(TINY_SUITE)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests")}
    env.pop("PYTEST_ADDOPTS", None)

    def run(*args):
        process = subprocess.run(
            [sys.executable, "-m", "pytest", "-c", str(REPO_ROOT / "pyproject.toml"),
             f"--rootdir={tmp_path}", "-p", "tiers", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert process.returncode in (0, 5), process.stdout + process.stderr
        return process.stdout
    return run


def _collected(run_pytest, *args):
    """The node ids that ``pytest <args>`` selects, sorted, and its output."""
    output = run_pytest("--collect-only", "-q", "-n", "0", *args)
    return sorted(line for line in output.splitlines() if line.startswith("tests/")), output


def test_a_plain_run_is_the_fast_tier_and_counts_what_it_leaves_out(run_pytest):
    selected, output = _collected(run_pytest)
    assert selected == FAST and "(3 deselected)" in output


@pytest.mark.parametrize("marker, expected", [("slow", SLOW), ("end_to_end", END_TO_END),
                                              ("not slow", sorted(FAST + END_TO_END))])
def test_a_marker_expression_picks_the_tiers(run_pytest, marker, expected):
    assert _collected(run_pytest, "-m", marker)[0] == expected


def test_a_test_named_by_node_id_runs_whatever_its_tier_and_a_file_keeps_the_filter(
        run_pytest, tmp_path):
    # A parametrized test named without its parameters is every one of them; a node id may
    # start with an absolute path.
    selected, _ = _collected(run_pytest, "tests/test_tiny.py::test_slow",
                             f"{tmp_path / 'tests' / 'test_tiny.py'}::test_processes")
    assert selected == sorted(SLOW + END_TO_END)
    assert _collected(run_pytest, "tests/test_tiny.py")[0] == FAST


def test_a_node_id_runs_in_the_default_worker_processes_too(run_pytest):
    output = run_pytest("-q", "tests/test_tiny.py::test_slow")
    assert "1 passed" in output
