"""paradigm=online: deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

The peers form one kdrun.engine.group.ModelGroup trained by the ordinary training loop: each step runs
every peer, the loss (kdrun.distill.mutual) gives each peer CE plus KL to the others' detached
predictions, and one optimizer over all peers applies each peer's own gradient, which equals the
paper's per-peer updates computed from the same batch. No second training loop is needed.
"""
from __future__ import annotations

import logging
from typing import Iterator

from kdrun.distill.mutual import mutual_learning_loss
from kdrun.engine.checkpoint import save_model
from kdrun.engine.evaluate import predict
from kdrun.engine.forward import StepForward
from kdrun.engine.group import ModelGroup, ensemble_logits
from kdrun.errors import KdrunError
from kdrun.evaluation.metrics import fidelity_metrics
from kdrun.paradigms.registry import PARADIGMS
from kdrun.paradigms.result import (ParadigmResult, combined_cost, log_test_scalars, model_metrics, term_temperatures,
                                    predict_test_split)
from kdrun.stages.context import RunContext, derive, model_config, plain
from kdrun.stages.roles import Role, obtain_baseline, train_role
from kdrun.stages.steps import Step, baseline_step
from kdrun.tensorboard.writer import open_writer

log = logging.getLogger("kdrun")


def peer_configs(ctx: RunContext) -> list[dict]:
    """paradigm.peers: a count (copies of the student) or a list of preset/model names."""
    peers = ctx.cfg.paradigm.get("peers", 2)
    if isinstance(peers, int):
        return [plain(ctx.cfg.student) for _ in range(peers)]
    return [model_config(name, "student") for name in peers]


def build_peers(ctx: RunContext, configs: list[dict]) -> ModelGroup:
    # Peer k starts from seed + k: identical copies on identical batches would stay identical forever.
    # Peer 0 gets the run's seed, hence the same start as the baseline student.
    return ModelGroup([derive(ctx, student=c, seed=ctx.cfg.seed + k).build_model("student")
                       for k, c in enumerate(configs)])


def online_steps(ctx: RunContext) -> Iterator[Step]:
    configs = peer_configs(ctx)
    settings = ctx.cfg.paradigm

    def build():
        loss = mutual_learning_loss(len(configs), float(settings.get("T", 1.0)), float(settings.get("kl_weight", 1.0)))
        return StepForward(build_peers(ctx, configs)), loss
    yield Step(f"peers {', '.join(c['name'] for c in configs)}", "paradigm.peers", build, ctx.recipe("student"))
    if ctx.cfg.baseline:
        for config in {repr(sorted(c.items())): c for c in configs}.values():
            yield baseline_step(derive(ctx, student=config))


@PARADIGMS.register("online", preflight=online_steps)
def run(ctx: RunContext) -> ParadigmResult:
    cfg, settings = ctx.cfg, ctx.cfg.paradigm
    if cfg.student.get("checkpoint"):
        # Copies of one start, on the same batches, with symmetric losses, would stay copies forever.
        raise KdrunError(f"student.checkpoint={cfg.student.checkpoint} is not read by paradigm=online: its peers "
                         "must start from different random weights; drop student.checkpoint")
    configs = peer_configs(ctx)
    names = [c["name"] for c in configs]
    cohort = build_peers(ctx, configs)
    loss = mutual_learning_loss(len(configs), float(settings.get("T", 1.0)), float(settings.get("kl_weight", 1.0)))
    log.info("online: %d peers (%s) learn from each other", len(names), ", ".join(names))

    writer = open_writer(ctx.run_dir)

    def each_peer_on_the_test_split(epoch: int, record: dict) -> None:
        accuracies = []
        for k, peer in enumerate(cohort.members):
            logits, labels = predict(peer, ctx.data.test, cfg.batch_size, ctx.device)
            accuracies.append((logits.argmax(1) == labels).float().mean().item())
            writer.add_scalar(f"epoch/peer{k}_val_top1", accuracies[-1], epoch + 1)
        record["peer_val_top1"] = accuracies
        writer.flush()

    role = Role("peers", StepForward(cohort), loss, ctx.model_meta("peers:" + ",".join(names)), ctx.recipe("student"),
                on_epoch=each_peer_on_the_test_split, writer=writer)
    try:
        result = train_role(ctx, role).result
        peers, peer_logits, labels = _evaluate_peers(ctx, cohort, names, result.history)
        ensemble_metrics = model_metrics(ctx, cohort, f"ensemble of {len(names)}", ensemble_logits(peer_logits),
                                         labels, cost=combined_cost(peers), best_top1=result.best_top1,
                                         best_epoch=result.best_epoch)
        log_test_scalars(writer, {**{f"peer{k}_top1": p["top1"] for k, p in enumerate(peers)},
                                  "ensemble_top1": ensemble_metrics["top1"]})
    finally:
        writer.close()
    for k, peer in enumerate(cohort.members):
        save_model(ctx.run_dir / "checkpoints" / f"peer{k}.pt", peer, ctx.model_meta(names[k]), f"peer{k}",
                   history=result.history)

    baselines = _baselines(ctx, configs) if cfg.baseline else {}
    for peer, config in zip(peers, configs):
        baseline = baselines.get(_key(config))
        peer["baseline_top1"] = baseline["top1"] if baseline else None
        peer["gain_over_baseline"] = peer["top1"] - baseline["top1"] if baseline else None
    student, baseline = peers[0], baselines.get(_key(configs[0]))
    rows = [(f"peer {k}", p) for k, p in enumerate(peers)] + [("ensemble", ensemble_metrics), ("baseline", baseline)]
    footer = "  ".join(f"peer {k}: {100 * p['gain_over_baseline']:+.2f} points over its baseline"
                       for k, p in enumerate(peers) if p["gain_over_baseline"] is not None)
    return ParadigmResult(models={"teacher": None, "baseline": baseline, "student": student, "peers": peers,
                                  "ensemble": ensemble_metrics},
                          rows=rows, history=result.history, footer=lambda metrics: footer,
                          deployable=("student", cohort.members[0]),
                          temperatures=term_temperatures(loss))


def _evaluate_peers(ctx: RunContext, cohort: ModelGroup, names: list[str], history: list[dict]):
    """Each peer's test metrics, its best/last epoch, and its fidelity to the other peers' mean prediction."""
    outputs = [predict_test_split(ctx, peer) for peer in cohort.members]
    logits = [out[0] for out in outputs]
    labels = outputs[0][1]
    peers = []
    for k, peer in enumerate(cohort.members):
        curve = {r["epoch"]: r["peer_val_top1"][k] for r in history if "peer_val_top1" in r}
        # The weights evaluated here are the last epoch's (the test split is the validation split); a
        # resumed run's history may lack that epoch's entry, written after its checkpoint.
        last_top1 = (logits[k].argmax(1) == labels).float().mean().item()
        curve[history[-1]["epoch"]] = last_top1
        best_epoch = max(curve, key=lambda epoch: (curve[epoch], -epoch))
        others = ensemble_logits([z for i, z in enumerate(logits) if i != k])
        peers.append(model_metrics(ctx, peer, names[k], logits[k], labels, peer=k,
                                   **fidelity_metrics(logits[k], others, float(ctx.cfg.paradigm.get("T", 1.0))),
                                   best_top1=curve[best_epoch], best_epoch=best_epoch, last_top1=last_top1))
    return peers, logits, labels


def _key(config: dict) -> str:
    return repr(sorted(config.items()))


def _baselines(ctx: RunContext, configs: list[dict]) -> dict[str, dict]:
    """Each distinct peer model trained alone on hard labels (through the stage cache)."""
    found = {}
    for config in configs:
        if _key(config) in found:
            continue
        outcome = obtain_baseline(derive(ctx, student=config))
        logits, labels = predict_test_split(ctx, outcome.model)
        found[_key(config)] = model_metrics(ctx, outcome.model, config["name"], logits, labels,
                                            source=outcome.source, path=outcome.path)
    return found
