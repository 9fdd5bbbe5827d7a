"""Hydra callback (conf/config.yaml: hydra.callbacks.report): the sweep report when a multirun ends, and
the sweep's own TensorBoard run (HParams config, report table and plots: kdrun/sweeps/tensorboard_run.py).

Hydra instantiates callbacks for every run, single or multi, so this module stays light; the report
itself (and matplotlib) loads only at the end of a multirun.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("kdrun")


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kdrun.sweeps.report import write_report
        from kdrun.sweeps.tensorboard_run import write_sweep_board

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(write_report(sweep_dir), flush=True)
        except Exception as error:  # the jobs' results are already on disk; a report problem must not hide them
            log.warning("no sweep report in %s: %s (run kdrun-report %s)", sweep_dir, error, sweep_dir)
            return
        try:  # the HParams config, the table and the plots as the sweep's own TensorBoard run
            write_sweep_board(sweep_dir)
        except Exception as error:
            log.warning("no sweep_summary TensorBoard run in %s: %s", sweep_dir, error)
