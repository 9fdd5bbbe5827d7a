"""Bad input: one line on stderr, a non-zero exit, no traceback, no half-written run directory.

The catalogue runs through tests/cli_batch.py: one process imports kdrun once and forks a child
per invocation, which calls kdrun's main() exactly as the `kdrun` command does. LIGHT cases are
answered before torch is imported (the batch checks it); HEAVY ones need a model or a dataset built.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
# A run that gets to the distill stage at once: the teacher is loaded, no baseline is trained.
LOADED_TEACHER = ["teacher.checkpoint={inputs}/teacher.pt", "baseline=false"]

def stored(name: str) -> list[str]:
    """A run distilling from the prepared teacher-outputs file `outputs_<name>.npz` (make_inputs)."""
    return ["baseline=false", f"teacher.outputs={{inputs}}/outputs_{name}.npz"]


# name: (arguments after the tiny experiment's (tiny_args), a piece of the one-line error). {inputs} is the folder of prepared files.
LIGHT = {
    "zero temperature": (["T=0"], "T=0.0 must be > 0"),
    "negative temperature": (["T=-2"], "T=-2.0 must be > 0"),
    "temperature not a number": (["T=hot"], "T=hot"),
    "temperature a list": (["T=[1,2]"], "could not be converted to Float"),
    "alpha above one": (["alpha=1.5"], "alpha=1.5 must be within [0, 1]"),
    "alpha below zero": (["alpha=-0.1"], "alpha=-0.1 must be within [0, 1]"),
    "alpha not a number": (["alpha=abc"], "alpha=abc"),
    "zero epochs": (["epochs=0"], "epochs=0 must be >= 1"),
    "fractional epochs": (["epochs=2.5"], "epochs=2.5"),
    "negative stage epochs": (["student.epochs=-1"], "student.epochs=-1 must be >= 1"),
    "zero batch size": (["batch_size=0"], "batch_size=0 must be >= 1"),
    "batch size not a number": (["batch_size=many"], "batch_size=many"),
    "zero learning rate": (["lr=0"], "lr=0.0 must be > 0"),
    "negative stage learning rate": (["teacher.lr=-0.1"], "teacher.lr=-0.1 must be > 0"),
    "learning rate not a number": (["lr=fast"], "lr=fast"),
    "negative seed": (["seed=-1"], "seed=-1 must be >= 0"),
    "fractional seed": (["seed=1.5"], "seed=1.5"),
    "unknown device": (["device=tpu"], "device=tpu is not a device"),
    "device with a bad index": (["device=cuda:x"], "device=cuda:x is not a device"),
    "progress not a choice": (["progress=maybe"], "progress=maybe must be auto, true or false"),
    "baseline not a bool": (["baseline=maybe"], "baseline=maybe"),
    "resume not a bool": (["resume=sometimes"], "resume=sometimes"),
    "negative figure count": (["tb_figures=-1"], "tb_figures=-1 must be >= 0"),
    "unknown precision": (["precision=fp8"], "precision=fp8 must be fp32, bf16 or fp16"),
    "unknown lr scaling rule": (["lr_scaling=square"], "lr_scaling=square must be none or linear"),
    "zero lr base batch": (["lr_base_batch=0"], "lr_base_batch=0 must be >= 1"),
    "compile not a bool": (["compile=maybe"], "compile=maybe"),
    "channels_last not a bool": (["channels_last=maybe"], "channels_last=maybe"),
    "pack not a bool": (["dataset=imagefolder", "dataset.root=x", "dataset.pack=maybe"], "dataset.pack"),
    "zero cache size": (["teacher.cache_max_mb=0"], "teacher.cache_max_mb=0.0 must be > 0"),
    "unknown key": (["teacher.colour=red"], "teacher.colour"),
    "misspelt top-level key": (["epoch=3"], "Key 'epoch' not in"),
    "unknown dataset": (["dataset=cifar11"], "unknown dataset 'cifar11'"),
    "unknown dataset name in config": (["dataset.name=cifar11"], "unknown dataset 'cifar11'"),
    "unknown method": (["distill=kdd"], "unknown distill 'kdd'"),
    "unknown optimizer": (["optim=adam"], "unknown optim 'adam'"),
    "unknown schedule": (["sched=step"], "unknown sched 'step'"),
    "unknown experiment": (["experiment=cifar100_resnet56"], "unknown experiment 'cifar100_resnet56'"),
    "unknown export format": (["export=onxx"], "export=onxx is not an export format: choose from onnx, program, "
                                               "torchscript (or a list: export=[onnx,program]); did you mean 'onnx'?"),
    "unknown export format in a list": (["export=[onnx,tflite]"], "export=tflite is not an export format"),
    "export not a name": (["export=3"], "export=3 must be a format or a list of them"),
    "unknown quantization": (["quantize=int4"], "unknown quantize 'int4'"),
    "zero calibration images": (["quantize=int8", "quantize.calibration=0"],
                                "quantize.calibration=0 must be >= 1 training images"),
    "missing checkpoint": (["teacher.checkpoint=nowhere/t.pt"], "no such file"),
    "checkpoint is a folder": (["teacher.checkpoint={inputs}"], "is a directory"),
    "unknown flag": (["--epochs=3"], "unknown option '--epochs'"),
    "unwritable run directory": (["hydra.run.dir={inputs}/blocker/run"], "Not a directory"),
    "unwritable sweep directory": (["-m", "T=1,2", "hydra.sweep.dir={inputs}/blocker/sweep"], "Not a directory"),
    # --- issue #19 points 1 and 6: checkpoints as teacher or student, the verified cache
    "missing student checkpoint": (["student.checkpoint=nowhere/s.pt"], "student.checkpoint=nowhere/s.pt: no such file"),
    # --- issue points 2 and 3: non-finite numbers anywhere, negative loss weights, values that reach torch ---
    "infinite temperature": (["T=inf"], "T=inf is not a finite number: pass a finite value, e.g. T=4.0"),
    "infinite learning rate": (["lr=inf"], "lr=inf is not a finite number"),
    "alpha nan": (["alpha=nan"], "alpha=nan is not a finite number"),
    "stage learning rate nan": (["teacher.lr=nan"], "teacher.lr=nan is not a finite number"),
    "term temperature infinite": (["distill.terms.kd.T=inf"], "distill.terms.kd.T=inf is not a finite number"),
    "dataset fraction nan": (["dataset=mnist5k", "dataset.test_fraction=nan"],
                             "dataset.test_fraction=nan is not a finite number"),
    "peer temperature nan": (["paradigm=online", "paradigm.T=nan"], "paradigm.T=nan is not a finite number"),
    "model option nan": (["+student.kwargs.drop_rate=nan"], "student.kwargs.drop_rate=nan is not a finite number"),
    "negative loss weight": (["distill.terms.kd.weight=-5"], "distill.terms.kd.weight=-5 is negative"),
    "negative dkd part weight": (["distill=dkd", "distill.terms.dkd.beta=-8"], "distill.terms.dkd.beta=-8 is negative"),
    "zero term temperature": (["distill.terms.kd.T=0"], "distill.terms.kd.T=0 must be > 0"),
    "virtual teacher sure of the label": (["distill=tfkd", "distill.terms.tfkd_reg.a=1"],
                                          "distill.terms.tfkd_reg.a=1 must be between 0 and 1"),
    "no mlkd temperatures": (["distill=mlkd", "distill.terms.mlkd.temperatures=[]"],
                             "distill.terms.mlkd.temperatures=[] must list numbers > 0"),
    "negative momentum": (["optim.momentum=-1"], "optim.momentum=-1.0 must be within [0, 1)"),
    "negative weight decay": (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
    "nesterov without momentum": (["optim.momentum=0"], "optim.nesterov=true needs optim.momentum > 0"),
    "adamw betas out of range": (["optim=adamw", "optim.betas=[0.9,1.5]"],
                                 "optim.betas=[0.9, 1.5] must be two numbers within [0, 1)"),
    "negative milestone": (["sched=multistep", "sched.milestones=[-1]"], "sched.milestones=[-1] must be epochs >= 0"),
    "negative decay factor": (["sched=multistep", "sched.gamma=-1"], "sched.gamma=-1.0 must be > 0"),
    "negative warm-up": (["sched.warmup_epochs=-1"], "sched.warmup_epochs=-1 must be >= 0"),
    "negative loader workers": (["+dataset.num_workers=-1"], "dataset.num_workers=-1 must be a whole number >= 0"),
    "validation share out of range": (["dataset.val_split=1"], "dataset.val_split=1.0 must be within [0, 1)"),
    "loader workers not a number": (["+dataset.num_workers=many"], "dataset.num_workers='many' must be a whole number"),
    "seed too large for the generators": (["seed=1000000000000000"], "seed=1000000000000000 must be < 100000000000000"),
    "unknown launcher": (["hydra/launcher=nope"], "unknown hydra/launcher 'nope': choose one of basic"),
    "unknown sweeper": (["-m", "hydra/sweeper=nope", "T=1,2"], "unknown hydra/sweeper 'nope': choose one of basic"),
    # --- issue point 4: Hydra's own hints survive the one line; misspelt keys and options get "did you mean"
    "several values without -m": (["T=2,4"], "T=2,4 gives T several values: to sweep over them add -m/--multirun "
                                             "(kdrun -m T=2,4); for a list write T=[2,4]"),
    "group options without -m": (["distill=kd,dkd"], "add -m/--multirun (kdrun -m distill=kd,dkd)"),
    "'+' on a key that exists": (["+T=3"], "T is already in the config: set it without the '+'"),
    "sweep function without -m": (["T=range(1,3)"], "T=range(1,3) is a sweep: add -m/--multirun"),
    "value Hydra cannot read": (["alpha=0.5)"], """quote it, e.g. kdrun 'alpha="0.5)"'"""),
    "unquoted '=' in a value": (["dataset.root=a=b"], """quote it, e.g. kdrun 'dataset.root="a=b"'"""),
    "unclosed list": (["T=[1,2"], """quote it, e.g. kdrun 'T="[1,2"'"""),
    "value the shell split at a space": (["dataset=imagefolder", "dataset.root=/my", "data"],
                                         "quote the whole override for the shell: kdrun 'dataset.root=/my data'"),
    "word without a value": (["teacher", "resnet50"], "'teacher' is not an override: write KEY=VALUE"),
    "misspelt key in the wrong case": (["Alpha=0.5"], "Key 'Alpha' not in kdrun's config; did you mean 'alpha'?"),
    "misspelt group": (["distil=kd"], "did you mean 'distill'?"),
    "group option in the wrong case": (["distill=KD"], "unknown distill 'KD'"),
    "misspelt model key": (["teacher.nme=resnet18"], "did you mean 'name'?"),
    "misspelt launcher": (["hydra/launcher=jobli"], "unknown hydra/launcher 'jobli': choose one of basic, joblib"),
    "interpolation of nothing": (["tb_figures=${nope}"], "tb_figures: Interpolation key 'nope' not found"),
    # --- stored teacher outputs (README "Stored teacher outputs"): the options ---
    "unknown export kind": (["paradigm=teacher", "teacher.export_outputs=true", "teacher.export_kind=probs"],
                            "teacher.export_kind=probs must be one of logits, topk, label"),
    "zero export k": (["paradigm=teacher", "teacher.export_outputs=true", "teacher.export_k=0"],
                      "teacher.export_k=0 must be >= 1"),
    "export outside paradigm teacher": (["teacher.export_outputs=true"], "pass paradigm=teacher"),
    "missing teacher outputs file": (["teacher.outputs=nowhere/t.npz"], "teacher.outputs=nowhere/t.npz: no such file"),
    "teacher outputs with online": (["paradigm=online", "teacher.outputs={inputs}/outputs_logits.npz"],
                                    "paradigm=online needs teacher models"),
    "teacher outputs and checkpoint": (["teacher.outputs={inputs}/outputs_logits.npz", *LOADED_TEACHER],
                                       "so teacher.checkpoint has nothing to act on"),
    "dot momenta out of range": (["optim=dot", "optim.delta=0.2"], "optim.momentum=0.9 and optim.delta=0.2 must give "
                                                                   "momentum - delta >= 0 and momentum + delta < 1"),
    # --- quantization-aware distillation (README "Export and quantization") ---
    "qat of another paradigm": (["paradigm=online", "quantize=qat"],
                                "paradigm=online ships another model: use quantize=int8 (post-training) for it"),
    "qat under autocast": (["quantize=qat", "precision=bf16"], "quantize=qat trains with fake quantization in fp32, "
                                                               "not under autocast: pass precision=fp32"),
    "qat compiled": (["quantize=qat", "compile=true"], "quantize=qat trains a torch.export graph that torch.compile "
                                                       "does not take here: pass compile=false"),
    "zero qat epochs": (["quantize=qat", "quantize.epochs=0"], "quantize.epochs=0 must be >= 1 epochs"),
    "zero qat lr": (["quantize=qat", "quantize.lr_scale=0"], "quantize.lr_scale=0.0 must be > 0"),
    # --- pruning (README "Pruning") ---
    "prune ratio above 1": (["prune.ratio=1.5"], "prune.ratio=1.5 must be strictly between 0 and 1"),
    "prune ratio of 0": (["prune.ratio=0"], "prune.ratio=0.0 must be strictly between 0 and 1"),
    "prune with the online paradigm": (["prune.ratio=0.5", "paradigm=online"],
                                       "prune.ratio with paradigm=online: pruning builds the student of paradigm=offline"),
    "prune importance unknown": (["prune.ratio=0.5", "prune.importance=taylor"], "prune.importance=taylor must be l2 or l1"),
}

HEAVY = {
    "unknown teacher preset": (["teacher=resnet5O"], "unknown teacher model 'resnet5O'; did you mean 'resnet50'"),
    "unknown student name": (["student.name=mobilenetv3_lage_100"], "did you mean 'mobilenetv3_large_100'"),
    "pretrained weights offline": (["teacher.name=resnet18", "teacher.pretrained=true"], "teacher.checkpoint=PATH"),
    "device without a GPU": (["device=cuda:3"], "device=cuda:3") if not torch.cuda.is_available() else
    (["device=cuda:99"], "device=cuda:99"),
    "cifar10 files missing": (["dataset=cifar10", "dataset.root=no_data_here"], "dataset.download=true"),
    "file that is not a checkpoint": (["teacher.checkpoint={inputs}/notes.pt"], "is not a readable checkpoint"),
    "truncated checkpoint": (["teacher.checkpoint={inputs}/truncated.pt"], "is not a readable checkpoint"),
    "checkpoint for 100 classes": (["teacher.checkpoint={inputs}/classes100.pt"],
                                   "has 100 output classes but the dataset has 10"),
    "kdrun checkpoint for 100 classes": (["teacher.checkpoint={inputs}/classes100_kdrun.pt"],
                                         "was trained for 100 classes but the dataset has 10"),
    "checkpoint for grayscale images": (["teacher.checkpoint={inputs}/gray.pt"],
                                        "takes 1-channel images but the dataset has 3 channels"),
    "kdrun checkpoint for grayscale images": (["teacher.checkpoint={inputs}/gray_kdrun.pt"],
                                              "was trained on 1-channel images but the dataset has 3 channels"),
    "checkpoint of another architecture": (["teacher.checkpoint={inputs}/resnet8.pt"], "does not fit 'cifar:resnet14'"),
    "batch larger than the data": (["batch_size=1000"], "batch_size=1000 is larger than the training set"),
    "teacher cache with mlkd's strong views": (["distill=mlkd", "teacher.cache=true"],
                                               "teacher.cache=true cannot serve mlkd's strong views"),
    "bad synthetic option": (["dataset.image_size=0"], "dataset.image_size=0 must be an integer >= 1"),
    "validation share too small to hold out an image": (["dataset.val_split=0.0001"],
                                                          "dataset.val_split=0.0001 holds out no image"),
    "misspelt dataset key": (["+dataset.augmnet=false"], "unknown key(s) dataset.augmnet"),
    "imagefolder without root": (["dataset=imagefolder"], "dataset.root is required"),
    "validation share of an image folder": (["dataset=imagefolder", "dataset.root={inputs}/one_class",
                                             "dataset.image_size=16", "dataset.val_split=0.5"],
                                            "dataset.val_split is not supported for dataset imagefolder"),
    "imagefolder root missing": (["dataset=imagefolder", "dataset.root={inputs}/nowhere"], "does not exist"),
    "imagefolder without train folder": (["dataset=imagefolder", "dataset.root={inputs}/blank"], "train not found"),
    "imagefolder without class folders": (["dataset=imagefolder", "dataset.root={inputs}/no_classes"],
                                          "no class subfolders"),
    "imagefolder class without images": (["dataset=imagefolder", "dataset.root={inputs}/empty_class"],
                                         "no images found in"),
    "imagefolder classes differ": (["dataset=imagefolder", "dataset.root={inputs}/classes_differ"],
                                   "class folders differ"),
    "undecodable image": (["dataset=imagefolder", "dataset.root={inputs}/bad_image", "dataset.image_size=16",
                           "batch_size=2"], "cannot decode image"),
    "undecodable image while packing": (["dataset=imagefolder", "dataset.root={inputs}/bad_image", "dataset.image_size=16",
                                         "dataset.pack=true", "dataset.pack_dir={inputs}/packs", "batch_size=2"],
                                        "cannot decode image"),
    "pack folder that is a file": (["dataset=imagefolder", "dataset.root={inputs}/one_class", "dataset.image_size=16",
                                    "dataset.pack=true", "dataset.pack_dir={inputs}/teacher.pt"],
                                   "cannot hold the packed images"),
    "unknown loss term type": ([*LOADED_TEACHER, "distill.terms.kd.type=kdd"], "unknown loss term type 'kdd'"),
    "unknown student layer": ([*LOADED_TEACHER, "distill=fitnets", "+distill.student_layers=[nope]",
                               "+distill.teacher_layers=[stages.1]"], "nope"),
    "layer lists of different lengths": ([*LOADED_TEACHER, "distill=fitnets",
                                          "+distill.student_layers=[stages.0,stages.1]",
                                          "+distill.teacher_layers=[stages.1]"],
                                         "distill.student_layers names 2 layers and distill.teacher_layers 1"),
    "unwritable cache": (["cache_dir={inputs}/blocker/cache"], "Not a directory"),
    # --- issue #19 points 1 and 6: checkpoints as teacher or student, the verified cache
    "student checkpoint of another architecture": ([*LOADED_TEACHER, "student.checkpoint={inputs}/teacher.pt"],
                                                   "does not fit 'cifar:resnet8'"),
    "online run's cohort as a teacher": (["teacher.checkpoint={inputs}/peers_last.pt", "teacher.name=cifar:resnet8",
                                          "baseline=false"], "holds all the peers of an online run"),
    "student checkpoint with online": (["paradigm=online", "student.checkpoint={inputs}/resnet8.pt"],
                                       "is not read by paradigm=online"),
    # --- issue point 2: what cannot train fails before any stage trains (the teacher would train first) ---
    "student too big for the image size": (["student.name=cifar:vgg8", "dataset.image_size=4"],
                                           "student cifar:vgg8 (baseline) fails a training step on a batch of 2 "
                                           "3x4x4 images"),
    "BatchNorm on batches of one image": (["student.name=mobilenetv3_small_050", "batch_size=1"],
                                          "cannot train on batches of 1 image (batch_size=1)"),
    "image folder of one class": (["dataset=imagefolder", "dataset.root={inputs}/one_class", "dataset.image_size=16",
                                   "batch_size=2"], "dataset imagefolder has 1 class (cat): a classifier needs 2"),
    "second teacher's checkpoint for 100 classes": (["paradigm=multi_teacher",
                                                     "teachers=[cifar:resnet14,{name: cifar:resnet14, checkpoint: "
                                                     "'{inputs}/classes100.pt'}]"], "has 100 output classes"),
    "assistant too big for the image size": (["paradigm=assistant", "assistant.name=cifar:vgg8", "dataset.image_size=4"],
                                             "assistant cifar:vgg8 fails a training step"),
    "loss not finite before training": (["T=1e-300"], "the loss of student cifar:resnet8 is not finite on its first "
                                                      "batch, before any training"),
    "unknown student layer, teacher to train": (["distill=fitnets", "+distill.student_layers=[nope]",
                                                 "+distill.teacher_layers=[stages.1]"], "nope"),
    # --- stored teacher outputs: each check of the file, before any training ---
    "export k above the class count": (["paradigm=teacher", "teacher.export_outputs=true", "teacher.export_kind=topk",
                                        "teacher.export_k=11"], "teacher.export_k=11 is more than the 10 classes"),
    "stored outputs not a file of the format": (["baseline=false", "teacher.outputs={inputs}/notes.pt"],
                                                "is not a teacher-outputs file (a NumPy .npz archive"),
    "stored outputs of another class count": (stored("classes7"), "holds outputs over 7 classes but dataset "
                                                                  "synthetic has 10"),
    "stored outputs of another split size": (stored("short"), "its train split has 300 rows but dataset synthetic "
                                                              "has 320 train samples (missing keys: 300, 301"),
    "stored outputs with a duplicate key": (stored("duplicate"), "its train split lists key(s) 5 more than once"),
    "stored outputs with an unknown key": (stored("unknown_key"), "key(s) 999 of its train split match none of "
                                                                  "dataset synthetic's train sample indices"),
    "stored outputs with nan": (stored("nan"), "its train_logits hold NaN or inf for 1 sample(s) (keys 7)"),
    "stored top-k not a distribution": (stored("topk_over_one"), "the top-5 probabilities of 1 train sample(s) are "
                                                                 "not a distribution (key 2 sums to 1.3)"),
    "stored outputs of another dataset version": (stored("other_version"), "was written for another version of "
                                                                           "dataset synthetic"),
    "stored outputs with a feature method": ([*stored("logits"), "distill=fitnets"],
                                             "distill=fitnets needs a white-box teacher"),
    "stored labels with a soft-target method": (stored("label"), "holds the teacher's labels only (kind label), but "
                                                                 "distill=kd (term kd) needs its probabilities: pass "
                                                                 "distill=hard"),
    "dot without a task term": (["optim=dot", "alpha=1"], "optim=dot needs a cross-entropy (task) term beside the "
                                                          "distillation terms"),
    "deit without a distillation token": (["distill=deit"], "distill=deit needs a student with a distillation token "
                                                            "and this one (CifarResNet) has none: use a timm "
                                                            "*_distilled_* model"),
}

# Runs into a directory that already holds work: the error must leave it as it was (metrics.json aside).
EXISTING_RUN = {
    "run directory of another model": ([*LOADED_TEACHER, "hydra.run.dir={inputs}/other_model_run"],
                                       "was written for model_name='cifar:resnet20'"),
    "torn last.pt and no earlier one": ([*LOADED_TEACHER, "hydra.run.dir={inputs}/torn_run"],
                                        "last.pt is unreadable (moved to *.corrupt)"),
}


def _model_state(name="cifar:resnet14", num_classes=10, in_chans=3):
    from kdrun.models import create_model

    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_chans=in_chans).state_dict()


def _kdrun_checkpoint(state, name="cifar:resnet14", num_classes=10, in_chans=3):
    return {"format": "kdrun-checkpoint", "version": 1, "model_name": name, "num_classes": num_classes,
            "in_chans": in_chans, "dataset": "synthetic", "stage": "teacher", "model": state}


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 255, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()).save(path)


def make_inputs(inputs: Path) -> None:
    """Every broken file and folder the catalogue points at."""
    inputs.mkdir()
    (inputs / "blocker").write_text("a file where a folder should be")
    (inputs / "notes.pt").write_text("these are not weights")
    teacher = _model_state()
    torch.save(teacher, inputs / "teacher.pt")
    whole = (inputs / "teacher.pt").read_bytes()
    (inputs / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save(_model_state(num_classes=100), inputs / "classes100.pt")
    torch.save(_kdrun_checkpoint(_model_state(num_classes=100), num_classes=100), inputs / "classes100_kdrun.pt")
    torch.save(_model_state(in_chans=1), inputs / "gray.pt")
    torch.save(_kdrun_checkpoint(_model_state(in_chans=1), in_chans=1), inputs / "gray_kdrun.pt")
    torch.save(_model_state("cifar:resnet8"), inputs / "resnet8.pt")
    (inputs / "blank").mkdir()
    for split in ("train", "val"):
        (inputs / "no_classes" / split).mkdir(parents=True)
        (inputs / "empty_class" / split / "cat").mkdir(parents=True)
        _png(inputs / "classes_differ" / split / "cat" / "1.png", 1)
        _png(inputs / "bad_image" / split / "cat" / "1.png", 2)
        _png(inputs / "bad_image" / split / "dog" / "1.png", 3)
    _png(inputs / "classes_differ" / "train" / "dog" / "1.png", 4)
    for i, split in enumerate(("train", "train", "val")):
        _png(inputs / "one_class" / split / "cat" / f"{i}.png", 10 + i)
    _png(inputs / "bad_image" / "train" / "dog" / "2.png", 5)
    (inputs / "bad_image" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    other = _kdrun_checkpoint(_model_state("cifar:resnet20"), name="cifar:resnet20")
    other.update(loss={}, optimizer={}, scheduler={}, epoch=1, history=[], best_top1=0.1, best_epoch=1, rng={})
    (inputs / "other_model_run" / "checkpoints").mkdir(parents=True)
    torch.save(other, inputs / "other_model_run" / "checkpoints" / "last.pt")
    (inputs / "torn_run" / "checkpoints").mkdir(parents=True)
    (inputs / "torn_run" / "checkpoints" / "last.pt").write_bytes(whole[:1000])
    peers = _kdrun_checkpoint(_model_state("cifar:resnet8"), name="peers:cifar:resnet8,cifar:resnet8")
    torch.save(peers, inputs / "peers_last.pt")  # an online run's last.pt: all its peers
    _teacher_outputs(inputs)


def _teacher_outputs(inputs: Path) -> None:
    """outputs_<case>.npz: teacher-outputs files for the tiny experiment's dataset, each wrong in one way."""
    import numpy as np

    from kdrun.data import build_dataset
    from kdrun.engine.teacher_file import write_outputs

    tiny = {"name": "synthetic", "image_size": 16, "train_size": 320, "test_size": 64}
    data = build_dataset(tiny)
    generator = torch.Generator().manual_seed(0)
    logits = {"train": torch.randn(320, 10, generator=generator), "test": torch.randn(64, 10, generator=generator)}
    for kind in ("logits", "topk", "label"):
        write_outputs(inputs / f"outputs_{kind}.npz", kind, 5, data, "cifar:resnet14", logits)
    write_outputs(inputs / "outputs_other_version.npz", "logits", None, build_dataset({**tiny, "seed": 1}),
                  "cifar:resnet14", logits)

    def changed(name: str, source: str, change) -> None:
        with np.load(inputs / f"outputs_{source}.npz") as archive:
            arrays = {key: archive[key] for key in archive.files}
        change(arrays)
        np.savez(inputs / f"outputs_{name}.npz", **arrays)

    def classes7(a):
        a["meta"] = np.array(str(a["meta"]).replace('"num_classes": 10', '"num_classes": 7'))
        a["train_logits"], a["test_logits"] = a["train_logits"][:, :7], a["test_logits"][:, :7]
    changed("classes7", "logits", classes7)
    changed("short", "logits",
            lambda a: a.update(train_keys=a["train_keys"][:300], train_logits=a["train_logits"][:300]))
    changed("duplicate", "logits", lambda a: a["train_keys"].__setitem__(6, 5))
    changed("unknown_key", "logits", lambda a: a["train_keys"].__setitem__(6, 999))
    changed("nan", "logits", lambda a: a["train_logits"].__setitem__((7, 3), np.nan))
    changed("topk_over_one", "topk", lambda a: a["train_topk_probs"].__setitem__(2, [0.5, 0.3, 0.2, 0.2, 0.1]))


def _arguments(args: list[str], inputs: Path, tiny: tuple[str, ...]) -> list[str]:
    """The case's arguments after the tiny experiment's (less its dataset, where the case names one)."""
    args = [a.replace("{inputs}", str(inputs)) for a in args]
    not_tiny_data = [a for a in tiny if not a.startswith("dataset")]
    base = not_tiny_data if any(a.startswith(("dataset=", "dataset.root")) for a in args) else tiny
    return [*base, *args]


def run_batch(mode: str, cases: dict, root: Path, inputs: Path, tiny: tuple[str, ...]) -> dict:
    """Run every case of `cases` in its own working directory; returns name -> (result, cwd)."""
    batch = root / mode
    batch.mkdir()
    payload, cwds = [], {}
    for i, (name, (args, _)) in enumerate(cases.items()):
        cwd = batch / f"case{i}"
        cwd.mkdir()
        cwds[name] = cwd
        payload.append({"args": _arguments(args, inputs, tiny), "cwd": str(cwd)})
    (batch / "cases.json").write_text(json.dumps(payload))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("KDRUN_TRACEBACK", None)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(HERE / "cli_batch.py"), mode, str(batch / "cases.json"),
                           str(batch / "results.json")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((batch / "results.json").read_text())
    return {name: (result, cwds[name]) for name, result in zip(cases, results)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors") / "inputs"
    make_inputs(folder)
    return folder


@pytest.fixture(scope="module")
def light_results(inputs, tiny_args):
    return run_batch("light", LIGHT, inputs.parent, inputs, tiny_args)


@pytest.fixture(scope="module")
def heavy_results(inputs, tiny_args):
    return run_batch("heavy", {**HEAVY, **EXISTING_RUN}, inputs.parent, inputs, tiny_args)


def assert_one_line_error(result: dict, expected: str) -> str:
    stderr = result["stderr"]
    assert result["rc"] == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    error_lines = [line for line in lines if line.startswith("kdrun: error:")]
    assert len(error_lines) == 1, stderr
    # Nothing else but kdrun's own timestamped log lines.
    assert all(line == error_lines[0] or line.startswith("[") for line in lines), stderr
    assert expected in error_lines[0], error_lines[0]
    return error_lines[0]


def assert_no_run_directory(cwd: Path) -> None:
    for runs in ("runs", "multirun"):
        left = list((cwd / "outputs" / runs).glob("*/*"))
        assert not left, f"a failed run left {left} behind"
    assert_no_half_written_cache_entry(cwd)


def assert_nothing_cached(cwd: Path) -> None:
    """Bad input is found before any stage trains: no stage-cache entry at all, so none without its model."""
    entries = [p for p in (cwd / "outputs" / "cache").glob("*/*") if p.is_dir()]
    assert not entries, f"a failed run left cache entries {entries} behind"


@pytest.mark.parametrize("name", LIGHT)
def test_bad_input_answered_before_torch_loads(name, light_results):
    result, cwd = light_results[name]
    assert_one_line_error(result, LIGHT[name][1])
    assert result["torch"] is False, "answering this should not need torch"
    assert_no_run_directory(cwd)
    assert_nothing_cached(cwd)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_bad_input_found_while_building(name, heavy_results):
    result, cwd = heavy_results[name]
    assert_one_line_error(result, HEAVY[name][1])
    assert_no_run_directory(cwd)
    assert_nothing_cached(cwd)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXISTING_RUN)
def test_bad_existing_run_directory_is_kept(name, heavy_results, inputs):
    result, _ = heavy_results[name]
    message = assert_one_line_error(result, EXISTING_RUN[name][1])
    run_dir = inputs / EXISTING_RUN[name][0][-1].split("/")[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"] == message[len("kdrun: error: "):]
    kept = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert kept & {"last.pt", "last.pt.corrupt"}, kept  # the user's file is still there (or moved aside)


def test_catalogue_is_large_and_names_the_fix():
    assert len(LIGHT) + len(HEAVY) + len(EXISTING_RUN) >= 30


def test_hydra_flags_are_the_ones_kdrun_lets_through():
    from hydra._internal.utils import get_args_parser

    from kdrun.cli.argv import HYDRA_FLAGS

    hydra_flags = {flag for action in get_args_parser()._actions for flag in action.option_strings}
    assert hydra_flags == set(HYDRA_FLAGS)


def test_crd_without_sample_indices_is_one_line():
    """Every kdrun dataset yields indices; a caller building the loss by hand may not pass them."""
    from kdrun.distill.context import FeatureShapes, StepContext
    from kdrun.distill.relation import CRDTerm
    from kdrun.errors import KdrunError

    term = CRDTerm(FeatureShapes(student_dim=8, teacher_dim=8, num_samples=16), nce_k=4)
    ctx = StepContext(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long), None,
                      student_embedding=torch.randn(2, 8), teacher_embedding=torch.randn(2, 8))
    with pytest.raises(KdrunError, match="crd needs sample indices from the dataset") as raised:
        term(ctx)
    assert "\n" not in str(raised.value)


def test_plain_state_dict_teacher_is_loaded_not_trained(kdrun, tmp_path, tiny_args):
    from kdrun.models import create_model

    torch.manual_seed(1)
    path = tmp_path / "t.pt"
    torch.save(create_model("cifar:resnet14", num_classes=10, in_chans=3).state_dict(), path)
    proc = kdrun(*tiny_args, f"teacher.checkpoint={path}", "baseline=false", "epochs=1", "hydra.run.dir=run")
    assert proc.returncode == 0, proc.stderr
    assert "teacher: loaded cifar:resnet14" in proc.stderr and "teacher: training" not in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"]["source"] == "checkpoint" and metrics["baseline"] is None


# --- issue #19 points 1 and 6: checkpoints as teacher or student, the verified cache

def assert_no_half_written_cache_entry(cwd: Path) -> None:
    """Every cache entry has its model (or, for teacher outputs, its manifest); an unfinished stage build
    (<key>.partial) is kept only with an epoch to resume from."""
    for folder in (cwd / "outputs" / "cache").glob("*/*"):
        if not folder.is_dir():
            continue  # <key>.lock
        if folder.name.endswith(".partial"):
            assert (folder / "last.pt").is_file(), f"a failed build left {folder} with nothing to resume"
        else:
            assert {p.name for p in folder.iterdir()} & {"model.pt", "manifest.json"}, f"{folder} has no model"


# --- issue points 4 and 5: quoting that Hydra reads back; a run directory another process runs ---------------

@pytest.mark.parametrize("value", ["/a b/c", "a=b", "0.5)", "[1,2", "x,y", "it's", 'say "hi"', "C:\\dir\\", "${T}"])
def test_the_quoted_form_reads_back_as_the_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kdrun.cli.hints import quoted_override

    quoted = quoted_override("dataset.root", value)
    assert OverridesParser.create().parse_override(quoted).value() == value


def test_shell_form_is_one_word_for_the_shell():
    import shlex

    from kdrun.cli.hints import shell_quoted

    for arg in ['dataset.root="a b"', "x=\"it's\"", "x='a'", 'x="$HOME"']:
        assert shlex.split(shell_quoted(arg)) == [arg]
    assert shell_quoted('alpha="0.5)"') == """'alpha="0.5)"'"""


def test_run_directory_in_use_is_left_to_its_process(kdrun, tmp_path, tiny_args):
    from kdrun.run_files import RUN_LOCK, holding_run

    busy = tmp_path / "busy"
    with holding_run(busy):
        proc = kdrun(*tiny_args, f"hydra.run.dir={busy}")
        held, left = (busy / RUN_LOCK).read_text(), sorted(p.name for p in busy.iterdir())
    line = assert_one_line_error({"rc": proc.returncode, "stderr": proc.stderr}, "is in use by a running kdrun")
    assert "hydra.run.dir=DIR" in line
    assert held.split()[0] == str(os.getpid())  # the holder's lock file was not touched, nor anything else
    assert left == [RUN_LOCK]


def test_run_directory_taken_after_the_check_is_left_to_its_process(tmp_path):
    """Two processes that pass the command-line check at once: the second to lock the directory stops."""
    from kdrun.run_files import RUN_LOCK, RunInUseError, holding_run

    with holding_run(tmp_path / "run"):
        with pytest.raises(RunInUseError, match=f"in use by a running kdrun \\(pid, host: {os.getpid()} "):
            with holding_run(tmp_path / "run"):
                pass
        assert (tmp_path / "run" / RUN_LOCK).is_file()
    assert not (tmp_path / "run" / RUN_LOCK).exists()  # removed when its run ends
