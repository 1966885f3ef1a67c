"""What a run logs: ``metrics.jsonl`` beside the run and, on rank 0, Weights & Biases.

One row per logged step (``step``, ``loss``, ``lr``, ``temperature``,
``samples_per_s``, ``world_size``, ``global_batch``, ``micro_batch_size``,
``peak_mem_mb``, ``time_s``, and ``grad_norm`` / ``nonfinite_skipped`` /
``queue/size`` / ``queue/age`` when they apply) and one evaluation row (``eval/*``). The same rows go to W&B under the same
step; the final evaluation also goes to the run's summary.
"""

from __future__ import annotations

import json
import math
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_infonce.trainer.config import Config, to_dict

__all__ = ["MetricsLog", "init_wandb", "resolve_wandb_mode"]


def resolve_wandb_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """``auto`` -> $WANDB_MODE if set, else online with an API key (env or netrc), else offline."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        path = env.get("NETRC") or str(Path.home() / ".netrc")
        if Path(path).is_file() and netrc.netrc(path).authenticators(host):
            return "online"
    except (netrc.NetrcParseError, OSError):
        pass
    return "offline"


def init_wandb(cfg: Config, run_id: str | None, output_dir: Path) -> Any:
    """Start (or resume, with ``run_id``) the W&B run on rank 0; None when disabled."""
    mode = resolve_wandb_mode(cfg.wandb.mode)
    if mode == "disabled":
        return None
    import wandb

    w = cfg.wandb
    return wandb.init(
        project=w.project,
        entity=w.entity,
        name=w.name or output_dir.resolve().name,
        group=w.group,
        tags=w.tags or None,
        config=to_dict(cfg),
        id=run_id,
        resume="allow" if run_id else None,
        mode=mode,
        dir=os.environ.get("WANDB_DIR") or str(output_dir),
    )


class MetricsLog:
    """``metrics.jsonl`` (and W&B) on rank 0; no-ops elsewhere.

    Args:
        path: the ``metrics.jsonl`` file.
        enabled: whether this process writes (rank 0).
        wandb_run: the W&B run rows also go to, or None.
    """

    def __init__(self, path: Path, enabled: bool, wandb_run: Any = None) -> None:
        self.path = path
        self.enabled = enabled
        self.wandb_run = wandb_run

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (written by a run that died after its checkpoint)
        and the eval rows of ``step`` itself (they are redone).

        A resumed run re-logs those steps; keeping one row per step makes the file
        the run's history, identical to an uninterrupted run's up to timings.
        """
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if not isinstance(row, dict):
                continue
            # An eval row of the resume step is redone too (a finished run re-run).
            last = step if "loss" in row else step - 1
            if row.get("step", math.inf) <= last:
                keep.append(line + "\n")
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` (it has a ``step``) to the file and to W&B."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")  # one write per row: a kill leaves whole lines
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def summary(self, values: Mapping[str, float]) -> None:
        """Put ``values`` (the final evaluation) in the W&B run's summary."""
        if self.wandb_run is not None:
            self.wandb_run.summary.update(dict(values))

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run (an offline run is complete on disk only after this)."""
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.finish(exit_code=exit_code)
