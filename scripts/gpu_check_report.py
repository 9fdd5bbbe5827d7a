"""gpu_check.py's verdicts against its targets, and its Markdown report (pure Python: no torch)."""
from __future__ import annotations

# The targets the numbers are read against (ratios within one run, so the machine cancels out).
KDRUN_VS_HAND_MIN = 0.95
CACHED_VS_BASELINE_MAX = 1.15
BF16_VS_FP32_224_MIN = 1.8
KD_ROW_240_MAX_MIN = 30.0


def _bench(report: dict, size: str, speed: str) -> dict:
    for name, section in report["sections"].items():
        if name.startswith(f"bench {size} ") and section.get("status") == "ok":
            found = section["speeds"].get(speed)
            if found and "timing" in found:
                return found
    return {}


def _verdict(value, limit: float, at_least: bool) -> dict:
    if value is None:
        return {"value": None, "target": limit, "passed": None, "note": "not measured"}
    return {"value": round(value, 3), "target": f"{'>=' if at_least else '<='} {limit}",
            "passed": value >= limit if at_least else value <= limit}


def targets(report: dict) -> dict:
    found = {}
    for size in ("32px b64", "224px b128"):
        fp32 = _bench(report, size, "fp32")
        ratios = fp32.get("ratios", {})
        found[f"kdrun / hand loop, {size} fp32"] = _verdict(ratios.get("kdrun_vs_hand"), KDRUN_VS_HAND_MIN, True)
        found[f"cached / baseline epoch, {size} fp32"] = _verdict(ratios.get("cached_epoch_vs_baseline"),
                                                                  CACHED_VS_BASELINE_MAX, False)
    fp32, bf16 = _bench(report, "224px b128", "fp32"), _bench(report, "224px b128", "bf16")
    speedup = None
    if fp32 and bf16:
        speedup = bf16["timing"]["kdrun"]["images_per_s"] / fp32["timing"]["kdrun"]["images_per_s"]
    found["bf16 / fp32 images/s, 224px b128 (kdrun)"] = _verdict(speedup, BF16_VS_FP32_224_MIN, True)
    projections = [s["projected_240_epochs_min"]["kd"] for name, s in report["sections"].items()
                   if name.startswith("cifar") and s.get("status") == "ok"]
    found["projected 240-epoch KD row, minutes (fastest settings)"] = _verdict(
        min(projections) if projections else None, KD_ROW_240_MAX_MIN, False)
    return found


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ok(passed) -> str:
    return {True: "pass", False: "FAIL", None: "not measured"}[passed]


def markdown(report: dict) -> str:
    sections = report["sections"]
    env = sections.get("environment", {})
    lines = [f"## kdrun GPU check: {env.get('gpu') or 'no GPU (CPU)'}, {report['started_utc']} UTC ({report['mode']})",
             "",
             f"driver {env.get('driver') or '-'}, CUDA {env.get('cuda_runtime') or '-'}, cuDNN {env.get('cudnn') or '-'}, "
             f"torch {env.get('torch', '-')}, torchvision {env.get('torchvision', '-')}, timm {env.get('timm', '-')}, "
             f"Python {env.get('python', '-')}, {env.get('cpu_count', '-')} CPUs; whole check {report.get('seconds', '-')} s "
             f"({report.get('cpu_s', '-')} CPU seconds)",
             "",
             "### Training throughput (scripts/bench.py: images/s, median epoch; GPU MB: peak allocated in the epoch)",
             "",
             "| size | speed | hand loop | kdrun | kdrun / hand | cached teacher | baseline | cached / baseline epoch | kdrun GPU MB (+MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    data_rows = []
    for name, section in sections.items():
        if not name.startswith("bench ") or section.get("status") != "ok":
            continue
        for speed, row in section["speeds"].items():
            if "timing" not in row:
                lines.append(f"| {section['size']} | {speed} | failed: {row.get('error', '?')[:120]} | | | | | | |")
                continue
            t, r = row["timing"], row["ratios"]
            memory = (f"{_num(t['kdrun'].get('cuda_peak_mb'))} (+{_num(t['kdrun'].get('cuda_delta_mb'))})"
                      if "cuda_peak_mb" in t["kdrun"] else "-")
            lines.append(f"| {section['size']} | {speed} | {_num(t['hand']['images_per_s'])} | {_num(t['kdrun']['images_per_s'])} "
                         f"| {r['kdrun_vs_hand']:.3f}x | {_num(t['cached']['images_per_s'])} | {_num(t['baseline']['images_per_s'])} "
                         f"| {r['cached_epoch_vs_baseline']:.3f}x | {memory} |")
            if "data_kdrun_vs_torchvision" in r:
                data_rows.append(f"| {section['size']} | {_num(t['data_kdrun']['images_per_s'])} | "
                                 f"{_num(t['data_torchvision']['images_per_s'])} | {r['data_kdrun_vs_torchvision']:.1f}x |")
    lines += ["", "### Data path (in-memory uint8, augmented on the device, vs a torchvision Dataset + PIL + DataLoader)", "",
              "| size | kdrun images/s | torchvision images/s | ratio |", "| --- | --- | --- | --- |", *data_rows]
    lines += ["", "### CIFAR-100-shaped run of the CLI (synthetic 32x32, 100 classes, 1 epoch each; seconds include validation)", "",
              "| settings | teacher epoch s | baseline epoch s | KD epoch s | 240 epochs of KD | teacher + baseline + KD, 240 epochs |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, section in sections.items():
        if name.startswith("cifar") and section.get("status") == "ok":
            epochs, projected = section["epoch_s"], section["projected_240_epochs_min"]
            lines.append(f"| {name[6:]} ({section['train_size']:,} images) | {epochs['teacher']:.1f} | {epochs['baseline']:.1f} "
                         f"| {epochs['student']:.1f} | {projected['kd']:.1f} min | {projected['row']:.1f} min |")
    lines += ["", "### Checks", "", "| check | value | target | result |", "| --- | --- | --- | --- |"]
    for name, verdict in report.get("targets", {}).items():
        lines.append(f"| {name} | {verdict['value'] if verdict['value'] is not None else '-'} | {verdict['target']} "
                     f"| {_ok(verdict['passed'])} |")
    for row in sections.get("parity", {}).get("checks", []):
        if "error" in row:
            lines.append(f"| {row['precision']} {row['method']} loss parity | {row['error'][:100]} | | FAIL |")
            continue
        tol = row["tolerance"]
        lines.append(f"| {row['precision']} autocast {row['method']} loss vs fp32 | rel. error {row['loss_rel']:.2e}, "
                     f"grad cosine {row['grad_cos']:.6f} | <= {tol['loss_rel']:.0e}, >= {tol['grad_cos']} | {_ok(row['passed'])} |")
    ddp = sections.get("ddp", {})
    if ddp.get("status") == "ok":
        probe = ddp["probe"]
        lines.append(f"| torchrun --nproc_per_node={ddp['cli']['processes']} through the CLI; DDP probe | "
                     f"run {ddp['cli']['status']}; {probe['backend']} all-reduce {probe['all_reduce']} | completed | pass |")
    lines += ["", "### Sections", "", "| section | status | seconds | CPU seconds | note |", "| --- | --- | --- | --- | --- |"]
    for name, section in sections.items():
        note = section.get("error") or section.get("reason") or "; ".join(section.get("errors", []))
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', '-')} | {section.get('cpu_s', '-')} "
                     f"| {str(note)[:200]} |")
    return "\n".join(lines)
