"""scripts/gpu_check.py: its CPU smoke (every section at toy sizes, the same code a GPU runs), and its guards:
a failing section is recorded and the next one runs; a section the budget cannot fit is skipped."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def _positive_numbers(value, path="") -> list[str]:
    """Paths of the numbers under `value` that are not finite and positive (seconds, images/s, ratios)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [] if math.isfinite(value) and value > 0 else [path]
    if isinstance(value, dict):
        return [bad for key, item in value.items() for bad in _positive_numbers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in _positive_numbers(item, f"{path}[{i}]")]
    return []


@pytest.mark.slow
def test_cpu_smoke_writes_every_measurement_and_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--cpu-smoke", "--budget-s", "600",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report, end = json.JSONDecoder().raw_decode(proc.stdout)
    table = proc.stdout[end:]
    assert json.loads((tmp_path / "work" / "gpu_check.json").read_text()) == report

    sections = report["sections"]
    assert report["mode"] == "cpu-smoke" and report["device"] == "cpu"
    assert list(sections) == ["install", "environment", "parity", "ddp", "bench 32px b64 fp32, bf16+channels_last",
                              "cifar fp32"]
    assert {name: s["status"] for name, s in sections.items() if s["status"] != "ok"} == {}
    assert sections["environment"]["torch"] and sections["environment"]["gpu"] is None

    parity = sections["parity"]
    assert {(r["precision"], r["method"]) for r in parity["checks"]} == {
        ("bf16", "kd"), ("bf16", "dkd"), ("fp16", "kd"), ("fp16", "dkd")}
    for row in parity["checks"]:
        assert row["passed"] and row["loss_rel"] <= row["tolerance"]["loss_rel"] and row["grad_cos"] <= 1.0 + 1e-6

    ddp = sections["ddp"]
    assert ddp["cli"]["status"] == "completed" and ddp["cli"]["exit_code"] == 0
    assert ddp["probe"]["backend"] == "gloo" and ddp["probe"]["all_reduce"] == ddp["probe"]["all_reduce_expected"]

    speeds = sections["bench 32px b64 fp32, bf16+channels_last"]["speeds"]
    assert set(speeds) == {"fp32", "bf16+channels_last"}
    assert set(speeds["fp32"]["timing"]) == {"hand", "kdrun", "cached", "baseline", "data_kdrun", "data_torchvision"}
    assert set(speeds["bf16+channels_last"]["timing"]) == {"hand", "kdrun", "cached", "baseline"}
    for row in speeds.values():
        assert _positive_numbers(row["timing"]) == [] and _positive_numbers(row["ratios"]) == []
        timing = row["timing"]
        assert row["ratios"]["kdrun_vs_hand"] == pytest.approx(
            timing["kdrun"]["images_per_s"] / timing["hand"]["images_per_s"])

    cifar = sections["cifar fp32"]
    assert set(cifar["epoch_s"]) == {"teacher", "baseline", "student"} and _positive_numbers(cifar["epoch_s"]) == []
    assert cifar["train_size"] == 128
    assert cifar["projected_240_epochs_min"]["kd"] == pytest.approx(240 * cifar["epoch_s"]["student"] / 60, abs=0.051)
    assert cifar["projected_240_epochs_min"]["row"] == pytest.approx(240 * sum(cifar["epoch_s"].values()) / 60, abs=0.051)

    verdicts = report["targets"]
    assert verdicts["kdrun / hand loop, 32px b64 fp32"]["value"] == pytest.approx(
        speeds["fp32"]["ratios"]["kdrun_vs_hand"], abs=1e-3)
    assert verdicts["bf16 / fp32 images/s, 224px b128 (kdrun)"]["passed"] is None  # not in the smoke

    assert "## kdrun GPU check: no GPU (CPU)" in table
    assert "| 32px b64 | fp32 |" in table and "| 32px b64 | bf16+channels_last |" in table
    assert "| fp32 (128 images) |" in table and "| bf16 autocast kd loss vs fp32 |" in table
    assert "| cifar fp32 | ok |" in table


def _check(tmp_path, budget_s: float = 60.0):
    return gpu_check.Check(gpu_check.parse_args(["--cpu-smoke", "--budget-s", str(budget_s), "--work", str(tmp_path)]))


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    check = _check(tmp_path)

    def broken(timeout_s):
        raise RuntimeError("first line\nsecond line")

    check.section("broken", 0, broken)
    check.section("fine", 0, lambda timeout_s: {"value": 3})
    broken_result, fine = check.report["sections"]["broken"], check.report["sections"]["fine"]
    assert broken_result["status"] == "failed" and broken_result["error"] == "RuntimeError: first line second line"
    assert fine["status"] == "ok" and fine["value"] == 3


def test_a_section_past_the_budget_is_skipped(tmp_path):
    check = _check(tmp_path, budget_s=5)
    ran = []
    check.section("too long", 30, lambda timeout_s: ran.append(timeout_s) or {})
    check.section("short", 1, lambda timeout_s: ran.append(timeout_s) or {})
    assert check.report["sections"]["too long"]["status"] == "skipped"
    assert "time budget" in check.report["sections"]["too long"]["reason"]
    assert len(ran) == 1 and 0 < ran[0] <= 5  # the section ran, with the budget's remainder as its timeout


def test_install_from_a_missing_wheel_folder_says_how_to_make_it(tmp_path):
    check = gpu_check.Check(gpu_check.parse_args(["--wheels", str(tmp_path / "none"), "--work", str(tmp_path)]))
    check.section("install", 0, lambda timeout_s: gpu_check.install(check, timeout_s))
    result = check.report["sections"]["install"]
    assert result["status"] == "failed" and "--make-wheels" in result["error"] and "\n" not in result["error"]


def test_targets_read_the_ratios_against_the_issue_limits():
    def bench(kdrun, hand, cached, baseline):
        timing = {"kdrun": {"images_per_s": kdrun}, "hand": {"images_per_s": hand}}
        return {"status": "ok", "speeds": {"fp32": {"timing": timing, "ratios": {
            "kdrun_vs_hand": kdrun / hand, "cached_epoch_vs_baseline": baseline / cached}}}}

    fast = bench(kdrun=960, hand=1000, cached=900, baseline=1000)   # 0.96x; 1.11x
    slow = bench(kdrun=900, hand=1000, cached=800, baseline=1000)   # 0.90x; 1.25x
    bf16 = {"timing": {"kdrun": {"images_per_s": 1700}}}           # 1700 / 900 = 1.89x
    slow["speeds"]["bf16"] = bf16
    report = {"sections": {"bench 32px b64 fp32, bf16": fast, "bench 224px b128 fp32, bf16": slow,
                           "cifar fp32": {"status": "ok", "projected_240_epochs_min": {"kd": 31.0}},
                           "cifar bf16+channels_last": {"status": "ok", "projected_240_epochs_min": {"kd": 18.5}}}}
    verdicts = gpu_check.targets(report)
    assert verdicts["kdrun / hand loop, 32px b64 fp32"]["passed"] is True
    assert verdicts["cached / baseline epoch, 32px b64 fp32"]["passed"] is True
    assert verdicts["kdrun / hand loop, 224px b128 fp32"]["passed"] is False
    assert verdicts["cached / baseline epoch, 224px b128 fp32"] == {"value": 1.25, "target": "<= 1.15", "passed": False}
    assert verdicts["bf16 / fp32 images/s, 224px b128 (kdrun)"]["value"] == pytest.approx(1.889, abs=1e-3)
    assert verdicts["projected 240-epoch KD row, minutes (fastest settings)"]["value"] == 18.5


def test_the_wheel_commands_pin_this_environment_and_fetch_no_dependencies():
    commands = gpu_check.wheel_commands("wheels")
    assert all("--no-deps" in argv for argv in commands)
    wheel = commands[0]
    assert wheel[2:4] == ["pip", "wheel"] and str(REPO) in wheel
    pinned = {arg.split("==")[0] for arg in wheel if "==" in arg}
    assert pinned == set(gpu_check.RUNTIME_MODULES.values()) - {"PyYAML"}
    downloads = [argv for argv in commands if "download" in argv]
    assert {argv[argv.index("--python-version") + 1] for argv in downloads} == set(gpu_check.WHEEL_PYTHONS)
