"""Training paradigms (paradigm=...): the losses against hand computations, what trains and what each
stage reads, the stage cache across paradigms, and the real CLI for every paradigm."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdrun.config.schema import register_configs, validate
from kdrun.distill.context import StepContext
from kdrun.distill.multi_teacher import MultiTeacherKDTerm, mixture_log_probs, multi_teacher_loss, teacher_weights
from kdrun.distill.mutual import mutual_learning_loss
from kdrun.engine.forward import StepForward
from kdrun.engine.group import ModelGroup
from kdrun.engine.trainer import Recipe, Stage, train
from kdrun.errors import KdrunError
from kdrun.models import create_model
from kdrun.paths import conf_dir

register_configs()
SGD = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def tiny_1(tiny_args):
    """tiny_args, smaller still: 96 training images (3 steps of 32), 32 test images, one epoch a stage."""
    return [a for a in tiny_args if not a.startswith(("dataset.train_size", "dataset.test_size", "epochs"))] + [
        "dataset.train_size=96", "dataset.test_size=32", "epochs=1"]


@pytest.fixture
def compose_cfg(tiny_1, tmp_path):
    """compose_cfg(*overrides): the composed config of tiny_1 plus `overrides`, caching into tmp_path."""
    def compose_tiny_1(*overrides):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=[*tiny_1, f"cache_dir={tmp_path / 'cache'}", *overrides])
    return compose_tiny_1


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# --- online: deep mutual learning -------------------------------------------------------------------

def test_mutual_loss_of_each_peer_matches_a_hand_computation():
    peers = [logits(5, 4, seed=s).requires_grad_() for s in range(3)]
    targets = torch.tensor([0, 1, 2, 3, 1])
    T, kl_weight = 2.0, 0.5
    total, parts = mutual_learning_loss(3, T, kl_weight)(StepContext(peers[0], targets, torch.arange(5),
                                                                      peer_logits=peers))
    total_by_hand = 0.0
    for k in range(3):
        ce = -torch.log(torch.softmax(peers[k], 1))[torch.arange(5), targets].mean()
        p_k = torch.softmax(peers[k] / T, 1)
        kls = []
        for other in (l for l in range(3) if l != k):
            p_l = torch.softmax(peers[other] / T, 1)
            kls.append(T * T * (p_l * (p_l.log() - p_k.log())).sum(1).mean())
        kl = sum(kls) / 2
        assert parts[f"peer{k}_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
        assert parts[f"peer{k}_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
        total_by_hand += ce + kl_weight * kl
    assert total.item() == pytest.approx(total_by_hand.item(), rel=1e-5)

    # Peer 0's KL reads the others' outputs, but only as targets: no gradient flows into them.
    grads = torch.autograd.grad(parts["peer0_kl"], peers, allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1] is None and grads[2] is None
    moved = [p.detach().clone() for p in peers]
    moved[2] += logits(5, 4, seed=9)
    _, moved_parts = mutual_learning_loss(3, T, kl_weight)(StepContext(moved[0], targets, torch.arange(5),
                                                                        peer_logits=moved))
    assert moved_parts["peer0_kl"].item() != pytest.approx(parts["peer0_kl"].item())
    assert moved_parts["peer0_ce"].item() == pytest.approx(parts["peer0_ce"].item())


def test_each_peer_gets_exactly_the_gradient_of_its_own_loss():
    """One backward of the summed loss through the training step's forward equals per-peer updates."""
    torch.manual_seed(0)
    cohort = ModelGroup([create_model("cifar:resnet8", 10, 3), create_model("cifar:resnet8", 10, 3)]).eval()
    images, labels = logits(8, 3, 16, 16), torch.arange(8) % 10
    ctx = StepForward(cohort)(images, labels, torch.arange(8), 0)
    assert [torch.allclose(z, m(images)) for z, m in zip(ctx.peer_logits, cohort.members)] == [True, True]
    loss = mutual_learning_loss(2, T=1.0, kl_weight=1.0)
    total, _ = loss(ctx)
    total.backward()
    together = [p.grad.clone() for p in cohort.members[0].parameters()]
    cohort.zero_grad()
    own = loss(StepForward(cohort)(images, labels, torch.arange(8), 0))[1]
    (own["peer0_ce"] + own["peer0_kl"]).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(together, cohort.members[0].parameters()))


@pytest.mark.slow
def test_online_training_changes_every_peer_and_logs_each(tmp_path):
    from kdrun.data import build_dataset

    data = build_dataset({"name": "synthetic", "image_size": 16, "train_size": 64, "test_size": 32})
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(create_model("cifar:resnet8", 10, 3))
    cohort = ModelGroup(members)
    before = copy.deepcopy(cohort.state_dict())
    stage = Stage("peers", Recipe(1, 0.05, 32, SGD, {"name": "cosine"}, 0), torch.device("cpu"), tmp_path, {})
    result = train(stage, StepForward(cohort), mutual_learning_loss(2), data.train, data.test)
    for k in range(2):
        changed = [n for n, v in cohort.state_dict().items()
                   if n.startswith(f"members.{k}.") and not torch.equal(v, before[n])]
        assert len(changed) > 10, f"peer {k} did not train"
    assert {f"loss_peer{k}_{part}" for k in range(2) for part in ("ce", "kl")} <= set(result.history[0])


# --- multi-teacher --------------------------------------------------------------------------------

def _kl_to(target_probs, student_logits, T):
    log_q = torch.log_softmax(student_logits / T, 1)
    return T * T * (target_probs * (target_probs.log() - log_q)).sum(1).mean()


def test_multi_teacher_mean_is_the_average_of_the_softened_outputs():
    teachers, student, targets, T = [logits(6, 5, seed=s) for s in (1, 2, 3)], logits(6, 5, seed=4), \
        torch.tensor([0, 1, 2, 3, 4, 0]), 3.0
    average = sum(torch.softmax(t / T, 1) for t in teachers) / 3
    mixture = mixture_log_probs(teachers, teacher_weights(teachers, targets, "mean"), T).exp()
    assert torch.allclose(mixture, average, atol=1e-6)
    ctx = StepContext(student, targets, torch.arange(6), teacher_group_logits=teachers)
    assert MultiTeacherKDTerm(T).forward(ctx).item() == pytest.approx(_kl_to(average, student, T).item(), rel=1e-5)
    # With alpha: (1 - alpha) * CE + alpha * KD, terms named like kd's.
    total, parts = multi_teacher_loss(0.75, T)(ctx)
    ce = F.cross_entropy(student, targets)
    assert total.item() == pytest.approx((0.25 * ce + 0.75 * _kl_to(average, student, T)).item(), rel=1e-5)
    assert set(parts) == {"ce", "kd"}


def test_multi_teacher_fixed_and_confidence_weights_match_hand_computations():
    teachers, student, targets, T = [logits(4, 3, seed=s) for s in (5, 6, 7)], logits(4, 3, seed=8), \
        torch.tensor([0, 2, 1, 1]), 2.0
    soft = [torch.softmax(t / T, 1) for t in teachers]
    ctx = StepContext(student, targets, torch.arange(4), teacher_group_logits=teachers)

    fixed = (2 * soft[0] + 1 * soft[1] + 1 * soft[2]) / 4
    assert MultiTeacherKDTerm(T, "fixed", [2, 1, 1]).forward(ctx).item() == pytest.approx(
        _kl_to(fixed, student, T).item(), rel=1e-5)

    # CA-MKD: per sample, w_i = (1 - softmax_i(CE_i)) / (M - 1), CE at T = 1 against the label.
    confident = torch.zeros(4, 3)
    for b in range(4):
        ce = [-torch.log_softmax(t[b], 0)[targets[b]] for t in teachers]
        exp = [torch.exp(c) for c in ce]
        weights = [(1 - e / sum(exp)) / 2 for e in exp]
        assert sum(weights).item() == pytest.approx(1.0)
        confident[b] = sum(w * s[b] for w, s in zip(weights, soft))
    assert torch.allclose(teacher_weights(teachers, targets, "confidence").sum(1), torch.ones(4))
    assert MultiTeacherKDTerm(T, "confidence").forward(ctx).item() == pytest.approx(
        _kl_to(confident, student, T).item(), rel=1e-5)
    # The teacher that is surer of the right class weighs more on that sample.
    best = torch.stack([F.cross_entropy(t, targets, reduction="none") for t in teachers], 1).argmin(1)
    assert torch.equal(teacher_weights(teachers, targets, "confidence").argmax(1), best)


# --- self: born-again networks --------------------------------------------------------------------

@pytest.mark.slow
def test_each_generation_distils_from_the_saved_previous_generation(tmp_path, monkeypatch, compose_cfg, read_metrics):
    import kdrun.paradigms.born_again as born_again
    from kdrun.run.pipeline import run_experiment

    seen = []
    real = born_again.distill_student

    def recording(ctx, teacher, teacher_top1):
        seen.append((ctx.run_dir, {k: v.clone() for k, v in teacher.state_dict().items()}, ctx.cfg.student.name))
        return real(ctx, teacher, teacher_top1)

    monkeypatch.setattr(born_again, "distill_student", recording)
    run_dir = tmp_path / "run"
    metrics = run_experiment(compose_cfg("paradigm=self", "paradigm.generations=2",
                                         "paradigm.ensemble=true", "baseline=false"), run_dir)
    assert [d for d, _, _ in seen] == [run_dir / "gen1", run_dir]
    assert {name for *_, name in seen} == {"cifar:resnet14"}  # the student has the teacher's architecture
    cached_teacher = torch.load(metrics["teacher"]["path"], weights_only=True)["model"]
    assert all(torch.equal(v, cached_teacher[k]) for k, v in seen[0][1].items())
    saved_gen1 = torch.load(run_dir / "gen1" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved_gen1[name]) for name, v in seen[1][1].items()), "gen 2's teacher is gen 1"
    assert not all(torch.equal(v, seen[0][1][k]) for k, v in seen[1][1].items())  # and not the teacher

    written = read_metrics(run_dir)
    assert [g["generation"] for g in written["generations"]] == [0, 1, 2]
    assert written["student"]["top1"] == written["generations"][-1]["top1"]
    assert written["gain_over_teacher"] == pytest.approx(written["student"]["top1"] - written["teacher"]["top1"])
    assert written["ensemble"]["params"] == 2 * written["student"]["params"]
    # The ensemble's top-1 is that of the mean of the two saved generations' softmax outputs.
    from kdrun.data import build_dataset
    from kdrun.engine.evaluate import predict

    cfg = compose_cfg("paradigm=self")
    data = build_dataset(cfg.dataset)
    probabilities = []
    for checkpoint in (run_dir / "gen1" / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt"):
        model = create_model("cifar:resnet14", data.num_classes, data.in_chans)
        model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
        predict_test_split, test_labels = predict(model.eval(), data.test, 32, torch.device("cpu"))
        probabilities.append(F.softmax(predict_test_split, dim=1))
    mean_prediction = (probabilities[0] + probabilities[1]) / 2
    expected = (mean_prediction.argmax(1) == test_labels).float().mean().item()
    assert written["ensemble"]["top1"] == pytest.approx(expected)
    events = EventAccumulator(str(run_dir)).Reload()
    by_generation = {e.step: e.value for e in events.Scalars("generation/test_top1")}
    assert by_generation == pytest.approx({g["generation"]: g["top1"] for g in written["generations"]})


# --- settings: one-line errors ---------------------------------------------------------------------

@pytest.mark.parametrize("paradigm", ["offline", "teacher", "baseline", "online", "self", "multi_teacher",
                                      "assistant"])
def test_every_paradigm_file_composes_and_cites_its_paper(compose_cfg, paradigm):
    import re

    from kdrun.paths import group_options

    assert paradigm in group_options("paradigm")
    text = (conf_dir() / "paradigm" / f"{paradigm}.yaml").read_text()
    assert re.search(r"(NIPS|CVPR|ICML|KDD|AAAI|ICASSP)[^\n]*(19|20)\d\d", text), "no paper cited"
    cfg = compose_cfg(f"paradigm={paradigm}", "teachers=[cifar:resnet14,resnet50]"
                      if paradigm == "multi_teacher" else "baseline=true")
    assert cfg.paradigm.name == paradigm
    validate(cfg)


def test_default_paradigm_is_offline_and_assistant_takes_presets_and_names(compose_cfg):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        assert compose(config_name="config").paradigm.name == "offline"
    assert compose_cfg("paradigm=assistant", "assistant=resnet34").assistant.name == "resnet34"
    from kdrun.cli.argv import preflight

    assert preflight(["assistant=cifar:resnet14"]) == ["assistant.name=cifar:resnet14"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["paradigm=online", "paradigm.peers=1"], "at least 2 peers"),
    (["paradigm=online", "paradigm.peers=[cifar:resnet8]"], "at least 2 peers"),
    (["paradigm=multi_teacher"], "needs a list of teachers"),
    (["paradigm=multi_teacher", "teachers=[]"], "needs a list of teachers"),
    (["paradigm=multi_teacher", "teachers=[a,b]", "paradigm.weighting=fixed", "paradigm.weights=[1,2,3]"],
     "3 values but there are 2 teachers"),
    (["paradigm=multi_teacher", "teachers=[a,b]", "paradigm.weighting=fixed"], "needs paradigm.weights"),
    (["paradigm=multi_teacher", "teachers=[a,b]", "paradigm.weights=[1,2]"], "add paradigm.weighting=fixed"),
    (["paradigm=multi_teacher", "teachers=[a,b]", "paradigm.weighting=vote"], "paradigm.weighting=vote is unknown"),
    (["paradigm=self", "paradigm.generations=0"], "paradigm.generations=0 must be"),
    (["paradigm=assistant", "assistant.checkpoint=x.pt"], "assistant.checkpoint=x.pt is not read"),
    (["paradigm.name=mutual"], "unknown paradigm 'mutual'"),
])
def test_bad_paradigm_settings_fail_with_one_line(compose_cfg, overrides, message):
    with pytest.raises(KdrunError, match=message) as error:
        validate(compose_cfg(*overrides))
    assert "\n" not in str(error.value)


def test_settings_a_paradigm_ignores_are_named(compose_cfg):
    from kdrun.config.paradigm_checks import unread_settings

    assert "teachers=['a', 'b'] is read by paradigm=multi_teacher only" in \
        unread_settings(compose_cfg("teachers=[a,b]"))[0]
    assert "distill=dkd is ignored" in unread_settings(compose_cfg("paradigm=online", "distill=dkd"))[0]
    assert unread_settings(compose_cfg()) == []


# --- the real CLI ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_teacher_paradigm_saves_a_teacher_that_offline_runs_reuse(kdrun, tmp_path, tiny_1, read_metrics):
    proc = kdrun(*tiny_1, "teacher.epochs=2", "paradigm=teacher", "hydra.run.dir=teacher_run")
    assert proc.returncode == 0, proc.stderr
    teacher_run = tmp_path / "teacher_run"
    metrics = read_metrics(teacher_run)
    assert metrics["paradigm"] == "teacher" and metrics["teacher"]["source"] == "trained"
    assert metrics["student"] is None and len(metrics["history"]) == 2
    saved = torch.load(teacher_run / "checkpoints" / "last.pt", weights_only=True)
    cached = torch.load(tmp_path / metrics["teacher"]["path"], weights_only=True)
    assert saved["model_name"] == "cifar:resnet14"
    assert all(torch.equal(v, cached["model"][k]) for k, v in saved["model"].items())
    assert (teacher_run / "checkpoints" / "best.pt").is_file()
    events = EventAccumulator(str(teacher_run)).Reload()
    assert events.Scalars("test/teacher_top1")[0].value == pytest.approx(metrics["teacher"]["top1"])
    assert len(events.Scalars("epoch/val_top1")) == 2

    # By config: an offline run with the same teacher and recipe takes it from the cache ...
    proc = kdrun(*tiny_1, "teacher.epochs=2", "baseline=false", "hydra.run.dir=offline_run")
    assert proc.returncode == 0, proc.stderr
    assert "teacher: reusing cached cifar:resnet14" in proc.stderr
    offline = read_metrics(tmp_path / "offline_run")
    assert offline["teacher"]["source"] == "cache" and offline["teacher"]["top1"] == metrics["teacher"]["top1"]
    # ... and by path, from the run directory.
    proc = kdrun(*tiny_1, "paradigm=teacher", f"teacher.checkpoint={teacher_run / 'checkpoints' / 'last.pt'}",
                 "hydra.run.dir=loaded")
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(tmp_path / "loaded")["teacher"]["top1"] == metrics["teacher"]["top1"]
    # ... and as one of several teachers, given as a model config with its checkpoint.
    saved_path = teacher_run / "checkpoints" / "last.pt"
    proc = kdrun(*tiny_1, "paradigm=multi_teacher", "baseline=false",
                 f"teachers=[{{name:'cifar:resnet14',checkpoint:'{saved_path}'}},'cifar:resnet8']", "hydra.run.dir=multi")
    assert proc.returncode == 0, proc.stderr
    multi = read_metrics(tmp_path / "multi")
    assert [(t["name"], t["source"]) for t in multi["teachers"]] == [("cifar:resnet14", "checkpoint"),
                                                                    ("cifar:resnet8", "trained")]
    assert multi["teachers"][0]["top1"] == metrics["teacher"]["top1"]


@pytest.mark.slow
def test_every_other_paradigm_runs_from_the_cli(kdrun, tmp_path, tiny_1, read_metrics):
    """One sweep, one job per paradigm, sharing the teachers through the cache."""
    sweep = ("-m", *tiny_1, "paradigm=baseline,online,self,multi_teacher,assistant",
             "teachers=[cifar:resnet14,cifar:resnet8]", "++paradigm.weighting=confidence",
             "assistant.name=cifar:resnet8", "hydra.sweep.dir=sweep")
    proc = kdrun(*sweep)
    assert proc.returncode == 0, proc.stderr
    jobs = {read_metrics(p)["paradigm"]: p for p in (tmp_path / "sweep").iterdir() if (p / "metrics.json").is_file()}
    assert set(jobs) == {"baseline", "online", "self", "multi_teacher", "assistant"}
    for paradigm, job in jobs.items():
        assert read_metrics(job)["status"] == "completed"
        assert (job / "checkpoints" / "last.pt").is_file() and list(job.glob("events.out.tfevents.*")), paradigm

    baseline = read_metrics(jobs["baseline"])
    assert baseline["baseline"]["source"] == "trained" and baseline["student"] is None

    online = read_metrics(jobs["online"])
    assert [p["peer"] for p in online["peers"]] == [0, 1] and online["student"] == online["peers"][0]
    assert online["baseline"]["source"] == "cache"  # the baseline job trained it
    assert online["peers"][0]["gain_over_baseline"] == pytest.approx(
        online["peers"][0]["top1"] - online["baseline"]["top1"])
    assert len(online["history"][0]["peer_val_top1"]) == 2
    # metrics.json records the temperature each loss term used: DML's paradigm.T, not the top-level T.
    assert online["temperatures"] == {"peer0_kl": 1.0, "peer1_kl": 1.0} and online["T"] == 4.0
    peer1 = torch.load(jobs["online"] / "checkpoints" / "peer1.pt", weights_only=True)
    assert peer1["model_name"] == "cifar:resnet8"
    # Every peer trained: each saved peer moved away from its own start (seed + k), and stays closer to it
    # than to the other peer's start (so the start is the one rebuilt here).
    starts = []
    for k in (0, 1):
        torch.manual_seed(k)
        starts.append(create_model("cifar:resnet8", 10, 3).state_dict())
    for k in (0, 1):
        trained = torch.load(jobs["online"] / "checkpoints" / f"peer{k}.pt", weights_only=True)["model"]

        def distance(start):
            return sum(float((trained[n].float() - v.float()).pow(2).sum()) for n, v in start.items()
                       if v.is_floating_point())
        assert 0 < distance(starts[k]) < distance(starts[1 - k]), k
    tags = set(EventAccumulator(str(jobs["online"])).Reload().Tags()["scalars"])
    assert {"epoch/peer0_val_top1", "epoch/peer1_val_top1", "train/loss_peer1_kl", "test/peer1_top1"} <= tags

    born_again = read_metrics(jobs["self"])
    assert len(born_again["generations"]) == 3 and (jobs["self"] / "gen1" / "checkpoints" / "last.pt").is_file()

    multi = read_metrics(jobs["multi_teacher"])
    assert [t["name"] for t in multi["teachers"]] == ["cifar:resnet14", "cifar:resnet8"]
    assert multi["teachers"][0]["source"] == "cache"  # the self job trained cifar:resnet14 as its teacher
    assert multi["teacher"]["weighting"] == "confidence" and "agreement" in multi["student"]
    assert multi["temperatures"] == {"kd": multi["T"]}

    assistant = read_metrics(jobs["assistant"])
    assert assistant["assistant"]["name"] == "cifar:resnet8" and assistant["teacher"]["source"] == "cache"
    assert (jobs["assistant"] / "assistant" / "checkpoints" / "best.pt").is_file()
    assert "assistant" in proc.stdout and "distilled" in proc.stdout

    # Each job recorded its overrides, so the same sweep again skips all five instead of training again.
    assert "paradigm=online" in online["overrides"]
    before = {job.name: (job / "metrics.json").stat().st_mtime_ns for job in jobs.values()}
    again = kdrun(*sweep)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("completed earlier with these overrides (metrics.json); skipping it") == 5
    assert {job.name: (job / "metrics.json").stat().st_mtime_ns for job in jobs.values()} == before


def test_cli_rejects_bad_paradigm_settings_in_one_line(kdrun, tiny_args):
    proc = kdrun(*tiny_args, "paradigm=online", "paradigm.peers=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("kdrun: error: paradigm=online needs at least 2 peers")
    proc = kdrun(*tiny_args, "paradigm=mutual")
    assert proc.returncode == 2 and "unknown paradigm 'mutual'" in proc.stderr
