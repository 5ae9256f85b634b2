"""Where metrics go: one JSON line per record in ``metrics.jsonl``, and TensorBoard.

Only the main rank writes. A resumed run appends to the same files, so a run's history
stays in one place; records carry their step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Appends metric records; state (open files) lives for the run, hence a class."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
