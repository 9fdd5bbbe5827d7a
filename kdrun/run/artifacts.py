"""The run's deployable model as artifacts, each checked rather than assumed: exported (export=onnx,
program, torchscript) and quantized to int8 (quantize=int8), then run on the test split by the runtime
that would serve it, compared with the PyTorch model's logits, and timed with the run's models.

quantize=qat trains the fake-quantized student here (kdrun.stages.qat, through the paradigm's `qat`), then
converts and exports it (kdrun.deploy.qat) and checks it as it checks the others.

metrics.json gains one entry per ONNX artifact (`student_onnx`, `student_int8`, `student_qat`: top-1, top-5, NLL, ECE,
size_mb, latency_ms, throughput, max_abs_logit_diff, agreement, top1_drop, speedup_vs_fp32) and `export`
(the files, the parity of each format, the calibration). A model that cannot be exported or quantized
keeps its training results: they are written, then the run ends with the one-line error.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdrun.config.deploy_checks import export_formats
from kdrun.deploy.export import FORMATS, export_model, export_program, write_preprocessing
from kdrun.deploy.onnx_runtime import OnnxRuntimeModel, onnxruntime
from kdrun.deploy.qat import QAT_FILE, export_int8
from kdrun.deploy.quantize import INT8_FILE, quantize_int8
from kdrun.engine import distributed
from kdrun.engine.evaluate import predict
from kdrun.engine.loaders import Batches
from kdrun.errors import KdrunError
from kdrun.evaluation.cost import timing_threads
from kdrun.evaluation.metrics import classification_metrics
from kdrun.paradigms.result import ParadigmResult, model_metrics, predict_test_split, runtime_cost
from kdrun.stages.context import RunContext
from kdrun.stages.qat import QAT_DIR, check_qat_run, example_images, qat_recipe

log = logging.getLogger("kdrun")

EXPORT_DIR = "export"
PARITY_TOLERANCE = 1e-3   # max |logit difference| an fp32 export may show against PyTorch before it is flagged


def wanted(ctx: RunContext) -> tuple[list[str], str]:
    """The export formats and the quantization the run asks for."""
    return export_formats(ctx.cfg.get("export")), str(ctx.cfg.quantize.name)


def deployable_role(ctx: RunContext) -> str:
    """The config role of the model a run ships: the teacher of paradigm=teacher, the student otherwise."""
    return "teacher" if str(ctx.cfg.paradigm.name) == "teacher" else "student"


def check_exportable(ctx: RunContext) -> None:
    """Before any stage trains: the untrained model of the shipped role goes through torch.export, so a
    model with data-dependent control flow fails now, in seconds, not after training."""
    formats, quantize = wanted(ctx)
    if quantize == "qat" and distributed.active():  # every process says it, none waits for the others
        raise KdrunError("quantize=qat trains the fake-quantized student in one process: launch kdrun without "
                         "torchrun (or use quantize=int8 after a torchrun run)")
    if not (formats or quantize != "none") or not distributed.is_main():
        return
    if "onnx" in formats or quantize != "none":
        onnxruntime()  # the check runs there: say now that the package is missing
    if quantize == "qat":
        check_qat_run(ctx)  # captured and fake-quantized: what the QAT stage will do to the trained student
    role = deployable_role(ctx)
    model = ctx.build_model(role).eval()
    # quantize=qat's check above went through torch.export already
    targets = [f for f in formats if f != "torchscript"] or (["onnx"] if quantize == "int8" else [])
    if targets:
        export_program(model, example_images(ctx), ctx.cfg[role].name, targets[0])


def deploy(ctx: RunContext, result: ParadigmResult) -> Optional[KdrunError]:
    """Export, quantize and check the run's deployable model; its artifacts join `result` (models, rows,
    extra["export"]). Returns the error that stopped it (the caller writes the results, then raises it)."""
    formats, quantize = wanted(ctx)
    if not (formats or quantize != "none") or result.deployable is None or not distributed.is_main():
        return None
    key, model = result.deployable
    reference = result.models[key]
    name = reference["name"]
    directory = ctx.run_dir / EXPORT_DIR
    # quantize=qat also quantizes the fp32 student after training, as quantize=int8 does: the table shows what
    # the QAT epochs bought over post-training quantization of the same student
    post_training = quantize in ("int8", "qat")
    files_wanted = formats + (["onnx"] if post_training and "onnx" not in formats else [])
    example = example_images(ctx)
    exported = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().float().eval()
    reference["size_mb"] = state_size_mb(exported)
    report: dict = {"directory": str(directory), "formats": formats, "quantize": quantize}
    result.extra["export"] = report
    try:
        files = export_model(exported, example, directory, files_wanted, name)
        shipped = {fmt: path for fmt, path in files.items() if fmt in formats}
        if post_training:
            shipped["int8"] = directory / INT8_FILE
        qat = None
        if quantize == "qat":
            qat = result.qat()  # the QAT stage trains here: its failure keeps the fp32 results
            shipped["qat"] = export_int8(qat.model, example, directory / QAT_FILE, name)
        report["preprocessing"] = str(write_preprocessing(directory, ctx.data, name, shipped))
        logits, labels = result.test_logits.get(key), result.labels
        if logits is None or labels is None:  # a paradigm that keeps no test logits of the shipped model
            logits, labels = predict_test_split(ctx, model)
        threads = timing_threads(ctx.device)
        for fmt, path in files.items():
            if fmt not in formats:
                continue  # the fp32 ONNX that int8 is made from, when only int8 was asked for
            report[fmt] = {"path": str(path), "size_mb": file_mb(path)}
            if fmt == "onnx":
                onnx = artifact(ctx, OnnxRuntimeModel(path, threads), f"{name} onnx", path, logits, labels, reference)
                add(result, key, "onnx", onnx)
                report[fmt]["max_abs_logit_diff"] = onnx["max_abs_logit_diff"]
            else:
                report[fmt]["max_abs_logit_diff"] = parity(load_pytorch_artifact(fmt, path), ctx, logits)
            if report[fmt]["max_abs_logit_diff"] > PARITY_TOLERANCE:
                log.warning("export=%s: logits differ from PyTorch's by up to %.2g (more than %g)", fmt,
                            report[fmt]["max_abs_logit_diff"], PARITY_TOLERANCE)
        if post_training:
            count = int(ctx.cfg.quantize.calibration)
            path = quantize_int8(files["onnx"], directory / INT8_FILE, ctx.data, count, ctx.cfg.seed, name)
            report["int8"] = {"path": str(path), "size_mb": file_mb(path), "backend": "onnxruntime",
                              "calibration_images": min(count, len(ctx.data.train))}
            int8 = artifact(ctx, OnnxRuntimeModel(path, threads), f"{name} int8", path, logits, labels, reference)
            add(result, key, "int8", int8)
            if "onnx" not in formats:  # only the int8 model was asked for: its fp32 source was a means
                files["onnx"].unlink()
        if qat is not None:
            path, recipe = shipped["qat"], qat_recipe(ctx)
            runtime = OnnxRuntimeModel(path, threads)
            fake_quant, _ = predict_test_split(ctx, qat.model)
            int8_logits, _ = predict_test_split(ctx, runtime)
            metrics = artifact(ctx, runtime, f"{name} qat", path, logits, labels, reference, int8_logits)
            add(result, key, "qat", metrics)
            report["qat"] = {
                "path": str(path), "size_mb": file_mb(path), "backend": "torchao pt2e + onnxruntime",
                "epochs": recipe.epochs, "lr": recipe.lr, "checkpoint": str(ctx.run_dir / QAT_DIR / "checkpoints"),
                "history": qat.history,
                # the converted int8 file against the fake-quantized model it came from: what conversion changed
                "fake_quant_top1": classification_metrics(fake_quant, labels)["top1"],
                "max_abs_diff_fake_quant": float((int8_logits - fake_quant).abs().max())}
    except KdrunError as error:
        report["error"] = str(error)
        return error
    log.info("export: %s", ", ".join(f"{k} {Path(v['path']).name} ({v['size_mb']:.2f} MB)"
                                     for k, v in report.items() if isinstance(v, dict) and "path" in v))
    return None


def artifact(ctx: RunContext, runtime: nn.Module, name: str, path: Path, reference_logits: torch.Tensor,
             labels: torch.Tensor, reference: dict, logits: Optional[torch.Tensor] = None) -> dict:
    """The test metrics of a model another runtime runs (its test `logits`, predicted here unless given),
    beside the PyTorch model's (`reference`)."""
    if logits is None:
        logits, _ = predict(runtime, ctx.data.test, ctx.cfg.batch_size, ctx.device)
    cost = runtime_cost(ctx, runtime, name, reference["params"], reference["flops"])
    top1 = classification_metrics(logits, labels)["top1"]
    return model_metrics(ctx, runtime, name, logits, labels, cost=cost, path=str(path), size_mb=file_mb(path),
                         max_abs_logit_diff=float((logits - reference_logits).abs().max()),
                         agreement=float((logits.argmax(1) == reference_logits.argmax(1)).float().mean()),
                         top1_drop=reference["top1"] - top1)


def add(result: ParadigmResult, key: str, kind: str, metrics: dict) -> None:
    """An artifact's metrics under `<key>_<kind>` and its row right after the rows of `key`'s model."""
    result.models[f"{key}_{kind}"] = metrics
    position = next(i for i, (_, m) in enumerate(result.rows) if m is result.models[key]) + 1
    while position < len(result.rows) and result.rows[position][0] in ("onnx", "int8", "qat"):
        position += 1
    result.rows.insert(position, (kind, metrics))


def compare_speed(result: ParadigmResult) -> None:
    """Once the run's models are timed: each artifact's speed-up over the PyTorch model it came from."""
    if result.deployable is None:
        return
    key = result.deployable[0]
    reference = result.models.get(key) or {}
    for kind in ("onnx", "int8", "qat"):
        metrics = result.models.get(f"{key}_{kind}")
        if metrics and metrics.get("latency_ms") and reference.get("latency_ms"):
            metrics["speedup_vs_fp32"] = reference["latency_ms"] / metrics["latency_ms"]


@torch.no_grad()
def parity(model, ctx: RunContext, reference_logits: torch.Tensor) -> float:
    """Max |logit difference| of a reloaded artifact against PyTorch's over the test split. Its own loop:
    a reloaded torch.export program is fixed in eval mode and refuses .eval() (predict calls it)."""
    logits = [model(images.float()).float() for images, _, _ in
              Batches(ctx.data.test, ctx.cfg.batch_size, torch.device("cpu"), shuffle=False)]
    return float((torch.cat(logits) - reference_logits).abs().max())


def load_pytorch_artifact(fmt: str, path: Path) -> nn.Module:
    if fmt == "program":
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit.load is deprecated in recent torch, as jit.trace
            return torch.jit.load(str(path), map_location="cpu")
    raise ValueError(f"not a PyTorch format: {fmt} (one of {sorted(FORMATS)})")


def state_size_mb(model: nn.Module) -> float:
    """The model's weights and buffers as stored (fp32 here), in MB (10^6 bytes)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def file_mb(path: Path) -> float:
    return Path(path).stat().st_size / 1e6
