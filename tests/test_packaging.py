"""The wheel carries conf/: an installed (non-editable) kdrun finds its configs from any directory."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed_site(tmp_path_factory):
    """Build kdrun's wheel and unpack it into a private site dir, as `pip install .` would."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(out.glob("kdrun-*.whl"))
    site = out / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_wheel_contains_every_config(installed_site):
    shipped = {p.relative_to(installed_site / "kdrun" / "conf") for p in (installed_site / "kdrun" / "conf").rglob("*.yaml")}
    in_repo = {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == in_repo and Path("config.yaml") in shipped


def test_installed_kdrun_composes_from_another_directory(installed_site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed_site)}
    probe = subprocess.run([sys.executable, "-c", "import kdrun.paths as p; print(p.conf_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == installed_site / "kdrun" / "conf"
    job = subprocess.run([sys.executable, "-m", "kdrun.cli", "student=resnet18", "T=3", "--cfg", "job"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    assert "name: resnet18" in job.stdout and "T: 3" in job.stdout and "name: mnist5k" in job.stdout


def test_installed_kdrun_help_prints_the_readme_it_ships(installed_site, tmp_path):
    """kdrun --help points pip users at `kdrun --help TOPIC`: the README travels in the wheel's metadata."""
    env = {**os.environ, "PYTHONPATH": str(installed_site)}
    proc = subprocess.run([sys.executable, "-m", "kdrun.cli", "--help", "metrics.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("### metrics.json") and "gain_over_baseline" in proc.stdout
    assert not (installed_site / "README.md").exists()  # read from kdrun-*.dist-info/METADATA


def test_installed_kdrun_inlines_the_report_page_script_and_style(installed_site, tmp_path):
    """report.html's script and style are files of the package: the wheel must carry them."""
    env = {**os.environ, "PYTHONPATH": str(installed_site)}
    code = ("import kdrun.sweeps.report_html as h; from importlib import resources; "
            "print(h.__file__); print(len(resources.files('kdrun.sweeps').joinpath('report_html.js').read_text()))")
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    module, size = probe.stdout.split()
    assert Path(module).parent == installed_site / "kdrun" / "sweeps" and int(size) > 1000
    assert (installed_site / "kdrun" / "sweeps" / "report_html.css").is_file()
