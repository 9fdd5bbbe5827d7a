"""test_methods_cli.py's check of every method through the real `kdrun -m` command, with the torchvision pair."""
import pytest
from test_methods_cli import run_sweep
from test_methods_cli import test_method_runs_through_the_cli_and_logs_each_term  # noqa: F401  (runs here on this sweep)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, run_kdrun, read_metrics):
    return run_sweep("torchvision", tmp_path_factory, run_kdrun, read_metrics)
