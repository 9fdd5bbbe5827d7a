"""The HParams tab's config (tensorboard.plugins.hparams): which hyperparameters and metrics it shows, in
which order, under which names.

Without a config, TensorBoard lists every hyperparameter alphabetically and shows the first five
(T, alpha, batch_size, dataset, epochs), and takes every scalar tag as a metric. With this one:

- hyperparameters: the swept keys (with their domains), then teacher, student and method,
  then the job's name and the constants. TensorBoard 2.x lists first, and shows by default five of,
  those marked `differs` (sorted by name); the swept keys and teacher/student/method are marked so.
- metrics, in this order (the first five are shown by default): the last points of the per-epoch
  curves (kdrun.tensorboard.curves), which are the numbers metrics.json reports.

A sweep writes it once, in its own run (kdrun.tensorboard.sweep_run). A single run writes none:
TensorBoard takes the first config it finds in a logdir, and one run's values must not filter the rows
of the others.
"""
from __future__ import annotations

from typing import Any, Iterable

from tensorboard.plugins.hparams import metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

METRICS = (
    ("epoch/val_top1", "student top-1"),
    ("epoch/gain_over_baseline", "gain over baseline"),
    ("epoch/agreement", "agreement with teacher"),
    ("epoch/ece", "student ECE"),
    ("epoch/kl_T", "KL(T) to teacher"),
    ("epoch/teacher_val_top1", "teacher top-1"),
    ("epoch/baseline_val_top1", "baseline top-1"),
)
MAIN = ("teacher", "student", "method")
JOB = "job"

# Overrides that name a main hparam another way (teacher.name=... is the `teacher` column).
SAME_AS_MAIN = {"teacher.name": "teacher", "student.name": "student", "dataset.name": "dataset",
                "distill": "method", "distill.name": "method"}


def hparam_order(sessions: list[dict[str, Any]], swept: Iterable[str] = ()) -> tuple[list[str], set[str]]:
    """Every hyperparameter of the sessions in the order the config lists them, and those marked `differs`:
    the swept keys (as the sweep names them, then any other key whose value differs), teacher, student
    and method."""
    keys = list(dict.fromkeys(key for session in sessions for key in session))
    distinct = {key: {repr(session.get(key)) for session in sessions} for key in keys}
    named = [SAME_AS_MAIN.get(key, key) for key in swept]
    varying = [key for key in dict.fromkeys(named) if key in keys and key != JOB]
    varying += [key for key in keys if key not in varying and key != JOB and len(distinct[key]) > 1]
    main = [key for key in MAIN if key in keys and key not in varying]
    rest = [key for key in keys if key not in varying and key not in main]
    rest.sort(key=lambda key: key != JOB)  # the job first among the rest
    return varying + main + rest, set(varying + main)


def _domain(values: list[Any]):
    """Strings: the values the sweep used (as TensorBoard infers them). Numbers: the interval they span,
    which TensorBoard draws as an axis and, unlike a list of values, never filters rows by: other runs in
    the same logdir stay in the table."""
    if all(isinstance(v, str) for v in values):
        return hp.Discrete(sorted(set(values)))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return hp.RealInterval(float(min(values)), float(max(values)))
    return None


def hparams_config_summary(sessions: list[dict[str, Any]], swept: Iterable[str] = (),
                           more_metrics: Iterable[tuple[str, str]] = ()):
    """The summary proto of the HParams config for runs with these hyperparameter values; `more_metrics`:
    (tag, display name) after METRICS, e.g. the deployed artifacts' `deploy/student_int8_top1`."""
    order, differs = hparam_order(sessions, swept)
    params = [hp.HParam(key, _domain([s[key] for s in sessions if key in s]), display_name=key) for key in order]
    metrics = [hp.Metric(tag, display_name=name) for tag, name in (*METRICS, *more_metrics)]
    summary = hp.hparams_config_pb(params, metrics)
    # summary_v2 has no `differs`; TensorBoard orders and picks the shown columns by it.
    value = summary.value[0]
    experiment = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    for info in experiment.hparam_infos:
        info.differs = info.name in differs
    value.metadata.plugin_data.content = plugin_data_pb2.HParamsPluginData(
        version=metadata.PLUGIN_DATA_VERSION, experiment=experiment).SerializeToString()
    return summary
