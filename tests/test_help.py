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
