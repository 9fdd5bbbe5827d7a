"""The sweep's own TensorBoard run, `<sweep dir>/sweep_summary`: the HParams config of the sweep (written
once, here, so that every job's row uses it), the report table (Text) and the report plots (Images).
It holds no session, so it adds no row to the HParams tab."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kdrun.tensorboard.hparams_config import hparams_config_summary
from kdrun.tensorboard.writer import open_writer

SWEEP_RUN = "sweep_summary"


def write_sweep_run(sweep_dir: Path, sessions: list[dict[str, Any]], swept: Iterable[str], table: str,
                    plots: Iterable[Path], more_metrics: Iterable[tuple[str, str]] = ()) -> Path:
    """Write the run from scratch (a re-run sweep replaces it: TensorBoard keeps the first config it reads)."""
    from PIL import Image  # installed with matplotlib

    run_dir = Path(sweep_dir) / SWEEP_RUN
    shutil.rmtree(run_dir, ignore_errors=True)
    writer = open_writer(run_dir)
    try:
        if sessions:
            writer.file_writer.add_summary(hparams_config_summary(sessions, swept, more_metrics), 0)
        writer.add_text("report/table", table, 0)
        for path in plots:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer.add_image(f"report/{Path(path).stem}", pixels, 0, dataformats="HWC")
    finally:
        writer.close()
    return run_dir
