"""`kdrun --help`: kdrun's own page, answered without composing a config or importing torch."""
import dataclasses
import subprocess
import sys

import pytest

from kdrun.config.schema import KdrunConfig
from kdrun.cli.help import GROUPS
from kdrun.paths import group_options


@pytest.fixture(scope="module")
def help_page():
    pages = [subprocess.run([sys.executable, "-m", "kdrun.cli", flag, "T=bad"], capture_output=True, text=True)
             for flag in ("--help", "-h")]
    for page in pages:
        assert page.returncode == 0 and page.stderr == "", page.stderr  # T=bad is not even looked at
    assert pages[0].stdout == pages[1].stdout
    return pages[0].stdout


def test_help_is_kdruns_own_page(help_page):
    assert help_page.startswith("kdrun: knowledge distillation in one command.")
    assert "Powered by Hydra" not in help_page and "== Config ==" not in help_page
    assert "usage: kdrun [-m] [GROUP=OPTION ...] [KEY=VALUE ...]" in help_page


def test_help_lists_every_config_group_with_all_its_options(help_page):
    listed = help_page.split("Config groups:")[1].split("Values:")[0]
    # Every folder of conf/ is a group users pick, except hydra/ (Hydra's own: launchers and sweepers,
    # shown in the examples) and model/, whose presets are the options of teacher, student and assistant.
    from kdrun.paths import MODEL_GROUPS, conf_dir

    folders = {p.name for p in conf_dir().iterdir() if p.is_dir()}
    assert "model" in folders and not folders & set(MODEL_GROUPS)  # one preset set, not one per role
    assert set(GROUPS) == folders - {"hydra", "model"} | set(MODEL_GROUPS)
    for role in MODEL_GROUPS:
        assert group_options(role) == group_options("model")
    for group in GROUPS:
        assert f"\n  {group} " in listed, group
        for option in group_options(group):
            assert option in listed, (group, option)


def test_help_explains_every_top_level_value(help_page):
    values = help_page.split("Values:")[1].split("Examples:")[0]
    scalars = [f.name for f in dataclasses.fields(KdrunConfig) if f.name not in GROUPS]
    assert set(scalars) >= {"T", "alpha", "epochs", "batch_size", "lr", "seed", "device", "baseline", "resume",
                            "cache_dir", "progress"}
    for key in scalars:  # a value added to the schema must be explained here too
        assert f"\n  {key} " in values, key


def test_help_shows_examples_and_exit_codes(help_page):
    examples = help_page.split("Examples:")[1]
    assert "kdrun teacher=resnet50 student=mobilenetv3 T=3" in examples and "kdrun -m T=1,2,4,8" in examples
    assert "2 bad input" in help_page and "3 training diverged" in help_page


# --- issue point 9: the documentation --help points to is one a pip user has ---------------------------------

def test_help_points_to_documentation_that_is_installed(help_page):
    assert "README.md" not in help_page
    assert "kdrun --help metrics.json" in help_page and "kdrun --help readme" in help_page


@pytest.mark.parametrize("topic, heading, inside", [
    ("metrics.json", "### metrics.json", "gain_over_baseline"),
    ("metrics", "### metrics.json", "gain_over_baseline"),
    ("resume", "## Resuming", "resume=true"),
    ("sweeps", "## Sweeps", "kdrun -m"),
    ("errors", "## Errors", "kdrun: error:"),
])
def test_help_topic_prints_that_readme_section(topic, heading, inside):
    proc = subprocess.run([sys.executable, "-m", "kdrun.cli", "--help", topic], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(heading + "\n") and inside in proc.stdout
    assert "\n## " not in proc.stdout  # that section alone, not the ones after it


def test_unknown_help_topic_is_one_line_listing_the_sections():
    proc = subprocess.run([sys.executable, "-m", "kdrun.cli", "--help", "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("kdrun: error: no README section matches 'nonsense': try one of Quickstart,")
    assert proc.stderr.count("\n") == 1


def test_readme_comes_from_the_package_metadata_without_a_checkout(monkeypatch):
    """What a pip user has: no README.md beside the package, the copy in the installed metadata."""
    import importlib.metadata
    from email.message import Message

    from kdrun.cli import help as help_module

    message = Message()
    message.set_payload("# kdrun\n\n## Outputs\n\nrun dirs\n\n### metrics.json\n\nkeys\n\n## Sweeps\n\n-m\n")
    monkeypatch.setattr(help_module, "__file__", "/nowhere/site-packages/kdrun/cli/help.py")
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: message)
    assert help_module.topic_text("metrics") == "### metrics.json\n\nkeys"
    assert help_module.topic_text("outputs") == "## Outputs\n\nrun dirs\n\n### metrics.json\n\nkeys"
