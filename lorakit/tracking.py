"""Experiment trackers (`train.report_to`): the run's metrics also go to TensorBoard or Weights & Biases.

`metrics.jsonl` stays the run's own record (lorakit.metrics); a tracker is handed each entry as it
is written there, on the main process only, with the optimizer step as its step. Names follow
transformers' Trainer, so runs of both sit side by side in one dashboard: a train entry's `loss`
becomes `train/loss`, an eval entry's `eval_loss` becomes `eval/loss`.

- tensorboard: event files in `output_dir/tensorboard/` (`tensorboard --logdir runs/`). A resumed
  run purges what the interrupted one logged after its checkpoint, as metrics.jsonl does; a new
  run, what one that died before its first checkpoint left.
- wandb: a W&B run named `train.run_name` (default: the output_dir's name) in the project
  `$WANDB_PROJECT` (default "lorakit"), its files under `output_dir/wandb/` unless `$WANDB_DIR`
  says otherwise. The resolved config is the run's config and the final summary its summary. A
  resumed run continues the same W&B run (its id is kept in the checkpoints); W&B keeps the first
  values logged at a step, so the steps a resume runs again keep the interrupted run's values.
  Offline (`WANDB_MODE=offline`) it writes locally, to `wandb sync` later; each start of the run
  then writes a folder of its own (the same run id), the steps a resume ran again in both.

A tracker that fails during the run is dropped with a warning; training and its files go on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lorakit.errors import UserError

# the trackers `train.report_to` may name, and the package each needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
# TensorBoard's event files, under output_dir
TENSORBOARD_DIR = "tensorboard"


def wandb_project() -> str:
    """The W&B project runs go to: $WANDB_PROJECT, else "lorakit"."""
    return os.environ.get("WANDB_PROJECT") or "lorakit"


def missing_packages(names: list[str]) -> list[str]:
    """The packages the named trackers need that are not installed."""
    return [TRACKER_PACKAGES[n] for n in names if n in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[n]) is None]


def tracker_name(key: str) -> str:
    """A metrics.jsonl key as trackers show it: eval_loss -> eval/loss, loss -> train/loss."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def check_tracker_paths(output_dir: Path, names: list[str]) -> None:
    """What the trackers will write in output_dir is not blocked by a file (for the dry run; the
    run finds it as it opens them).

    Raises:
        UserError: output_dir/tensorboard is a file.
    """
    folder = output_dir / TENSORBOARD_DIR
    if "tensorboard" in names and folder.exists() and not folder.is_dir():
        raise UserError(f"train.report_to: tensorboard cannot write {folder} (a file is there); remove it or pick another "
                        "output_dir")  # fmt: skip


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, output_dir: Path, config: dict[str, Any], resume_step: Optional[int]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what earlier writers logged at this step and after: what the
        # interrupted run logged past the checkpoint a resume starts from, and for a new run all that
        # a run which died before its first checkpoint left in the folder
        folder = output_dir / TENSORBOARD_DIR
        try:
            self.writer = SummaryWriter(str(folder), purge_step=0 if resume_step is None else resume_step + 1)
        except OSError as exc:
            raise UserError(f"train.report_to: tensorboard cannot write {folder} ({exc.strerror or exc}); remove what is "
                            "in the way or pick another output_dir") from None  # fmt: skip
        if resume_step is None:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def state(self) -> dict[str, Any]:
        return {}

    def finish(self, summary: dict[str, Any], failed: bool) -> None:
        if summary:
            self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2) + "\n```", summary.get("steps", 0))
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, output_dir: Path, run_name: str, config: dict[str, Any], run_id: Optional[str]) -> None:
        import wandb

        kwargs: dict[str, Any] = dict(project=wandb_project(), name=run_name, config=config)
        if run_id is not None:
            kwargs.update(id=run_id, resume="allow")
        if not os.environ.get("WANDB_DIR"):
            output_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(output_dir)
        try:
            self.run = wandb.init(**kwargs)
        except Exception as exc:  # wandb raises its own errors (not logged in, no network, bad entity)
            raise UserError(
                f"train.report_to: wandb did not start ({exc.__class__.__name__}: {_first_line(exc)}); log in with `wandb login`, "
                "or set WANDB_MODE=offline to record the run locally and `wandb sync` it later"
            ) from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def state(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run.id}

    def finish(self, summary: dict[str, Any], failed: bool) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers `train.report_to` names, opened together and fed every metrics entry."""

    def __init__(
        self, names: list[str], output_dir: Union[str, Path], *, run_name: str, config: dict[str, Any],
        resume_state: Optional[dict[str, Any]] = None,
    ) -> None:  # fmt: skip
        """resume_state: `state()` as a checkpoint kept it, with the checkpoint's `step`; None for a new run."""
        output_dir = Path(output_dir)
        resume_step = None if resume_state is None else int(resume_state.get("step", 0))
        self.trackers: list[Any] = []
        try:
            for name in names:
                if name == "tensorboard":
                    self.trackers.append(TensorBoardTracker(output_dir, config, resume_step))
                elif name == "wandb":
                    run_id = (resume_state or {}).get("wandb_run_id")
                    self.trackers.append(WandbTracker(output_dir, run_name, config, run_id))
                else:
                    raise ValueError(f"unknown tracker {name!r}")
        except BaseException:
            self.finish({}, failed=True)
            raise

    def log(self, entry: dict[str, Any]) -> None:
        """One metrics.jsonl entry: its numbers at its `step`. A tracker that fails (its service
        process killed, a full disk) is dropped with a warning: training goes on, and metrics.jsonl
        keeps every entry."""
        values = {
            tracker_name(k): float(v) for k, v in entry.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # fmt: skip
        for tracker in list(self.trackers):
            try:
                tracker.log(values, int(entry["step"]))
            except Exception as exc:
                self.trackers.remove(tracker)
                _warn(tracker, exc, "training goes on without it; metrics.jsonl keeps every entry")

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same tracker runs (kept in checkpoints)."""
        return {k: v for tracker in self.trackers for k, v in tracker.state().items()}

    def finish(self, summary: dict[str, Any], *, failed: bool = False) -> None:
        """Write the final summary (when there is one) and close every tracker; safe to call twice."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish(summary, failed)
            except Exception as exc:  # the run's own files are written; a tracker's end is not worth a failure
                _warn(tracker, exc, "its record of the run may lack the end")


def _warn(tracker: Any, exc: Exception, consequence: str) -> None:
    print(f"warning: train.report_to: {tracker.name} failed ({exc.__class__.__name__}: {_first_line(exc)}); {consequence}",
          file=sys.stderr)  # fmt: skip


def _first_line(exc: Exception) -> str:
    """An exception's message up to its first line break (services write pages of help after it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
