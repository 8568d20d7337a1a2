"""Experiment trackers (`train.report_to`, lorakit.tracking): what TensorBoard and W&B receive
equals metrics.jsonl, step for step, also across a crash and resume."""

import importlib.machinery
import json
import sys
import types

import pytest
import yaml
from helpers import crash_and_resume, training_workspace

from lorakit.cli import main
from lorakit.tracking import tracker_name


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return training_workspace(tmp_path_factory.mktemp("tracking"), train=64, eval=4)


def _config(root, out, **train):
    cfg = {
        "model": str(root / "model"),
        "output_dir": str(out),
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 3.0e-3, "precision": "fp32", "eval_every": 3, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _expected(out) -> dict[str, dict[int, float]]:
    """metrics.jsonl as trackers should show it: name -> {step: value}."""
    want: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if key != "step":
                want.setdefault(tracker_name(key), {})[entry["step"]] = value
    return want


def test_tracker_names_follow_transformers():
    assert tracker_name("loss") == "train/loss" and tracker_name("grad_norm") == "train/grad_norm"
    assert tracker_name("eval_loss") == "eval/loss" and tracker_name("eval_reward_accuracy") == "eval/reward_accuracy"


def _tensorboard_scalars(out) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    got = {}
    for tag in events.Tags()["scalars"]:
        scalars = events.Scalars(tag)
        steps = [s.step for s in scalars]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"
        got[tag] = {s.step: s.value for s in scalars}
    return got


def _assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        assert list(got[name].values()) == pytest.approx(list(want[name].values()), rel=rel), name  # float32 in TensorBoard


def test_tensorboard_gets_every_entry_and_the_config(workspace, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workspace / "tb"
    assert main(["train", _config(workspace, out, report_to="tensorboard")]) == 0
    printed = capsys.readouterr().out
    assert f"tracking     tensorboard ({out / 'tensorboard'})" in printed and "eval         4 examples; every 3 steps\n" in printed
    got, want = _tensorboard_scalars(out), _expected(out)
    assert sorted(want["train/loss"]) == [1, 2, 3, 4, 5, 6] and sorted(want["eval/loss"]) == [3, 6]
    _assert_same(got, want)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "lr: 0.003" in texts["config/text_summary"] and "total_steps: 6" in texts["config/text_summary"]
    assert json.loads(texts["summary/text_summary"].split("```json\n")[1].split("```")[0])["steps"] == 6


def test_tensorboard_after_a_crash_and_resume_shows_each_step_once(workspace, monkeypatch):
    # the resumed writer purges what the crashed run logged after its checkpoint (steps 4 and 5 past
    # step 3); on CPU the rerun gives the same bits, so the record equals an uninterrupted run's
    out = workspace / "tb_resumed"
    crash_and_resume(monkeypatch, _config(workspace, out, report_to=["tensorboard"], save_every=3), crash_at=5)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    _assert_same(_tensorboard_scalars(out), _expected(out))
    assert sorted(_expected(out)["train/loss"]) == [1, 2, 3, 4, 5, 6]


class FakeWandb:
    """A stand-in for the wandb package that records what lorakit hands it."""

    def __init__(self, fail: Exception | None = None, fail_log_at: int | None = None) -> None:
        self.inits, self.logged, self.finished, self.fail, self.fail_log_at = [], [], [], fail, fail_log_at

    def module(self) -> types.ModuleType:
        module = types.ModuleType("wandb")
        module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what the installed-package check reads
        module.init = self.init
        return module

    def init(self, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or "run-one"
            summary: dict = {}

            def log(self, values, step):
                if len(fake.logged) == fake.fail_log_at:
                    raise ConnectionResetError("[Errno 104] Connection reset by peer")
                fake.logged.append((step, dict(values)))

            def finish(self, exit_code=0):
                fake.finished.append((exit_code, dict(self.summary)))

        Run.summary = {}
        return Run()


def test_wandb_gets_every_entry_the_config_and_the_summary(workspace, monkeypatch, capsys):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = workspace / "wandb_fake"
    assert main(["train", _config(workspace, out, report_to="wandb")]) == 0
    assert "tracking     wandb (project lorakit, run wandb_fake)" in capsys.readouterr().out
    (init,) = fake.inits
    assert init["project"] == "lorakit" and init["name"] == "wandb_fake" and init["dir"] == str(out)
    assert init["config"]["train"]["lr"] == 3.0e-3 and init["config"]["run"]["total_steps"] == 6 and "id" not in init
    got: dict[str, dict[int, float]] = {}
    for step, values in fake.logged:
        for name, value in values.items():
            assert step not in got.get(name, {})
            got.setdefault(name, {})[step] = value
    _assert_same(got, _expected(out), rel=0)
    ((exit_code, summary),) = fake.finished
    written = json.loads((out / "summary.json").read_text())
    assert exit_code == 0 and summary["eval_loss"] == written["eval_loss"] and summary["steps"] == 6


def test_wandb_resume_continues_the_same_run(workspace, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.setenv("WANDB_DIR", str(workspace))
    out = workspace / "wandb_resumed"
    crash_and_resume(monkeypatch, _config(workspace, out, report_to="wandb", run_name="named", save_every=3), crash_at=5)
    first, second = fake.inits
    assert first["project"] == second["project"] == "mine" and first["name"] == "named" and "dir" not in first
    assert "id" not in first and second["id"] == "run-one" and second["resume"] == "allow"
    assert json.loads((out / "checkpoints" / "step-3" / "state.json").read_text())["trackers"] == {"wandb_run_id": "run-one"}
    assert [code for code, _ in fake.finished] == [1, 0]  # the crashed run is marked failed
    # the resumed run logs again from the step after its checkpoint (3); W&B keeps the first values of steps 4, 5
    steps = [step for step, values in fake.logged if "train/loss" in values]
    assert steps == [1, 2, 3, 4, 5, 4, 5, 6]


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(workspace, monkeypatch, capsys):
    # wandb's service process killed (a job scheduler signalling every process): a warning, not a lost run
    fake = FakeWandb(fail_log_at=2)
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    out = workspace / "wandb_dies"
    assert main(["train", _config(workspace, out, report_to=["wandb", "tensorboard"])]) == 0
    err = capsys.readouterr().err
    assert "warning: train.report_to: wandb failed (ConnectionResetError: [Errno 104] Connection reset by peer); " \
           "training goes on without it; metrics.jsonl keeps every entry" in err  # fmt: skip
    assert len(fake.logged) == 2 and not fake.finished and (out / "summary.json").is_file()
    _assert_same(_tensorboard_scalars(out), _expected(out))  # the other tracker goes on


def test_a_new_run_hides_what_a_run_that_died_before_its_first_checkpoint_logged(workspace, monkeypatch):
    from lorakit import train as train_module

    out = workspace / "tb_died"
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda run: (_ for _ in ()).throw(RuntimeError("crash")) if run.step == 4 else real_step(run))
    with pytest.raises(RuntimeError, match="crash"):
        main(["train", _config(workspace, out, report_to="tensorboard", lr=1e-2)])
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert main(["train", _config(workspace, out, report_to="tensorboard")]) == 0  # no checkpoint: a new run
    _assert_same(_tensorboard_scalars(out), _expected(out))


def test_wandb_offline_writes_the_run_into_output_dir(workspace, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = workspace / "wandb_offline"
    assert main(["train", _config(workspace, out, report_to="wandb", max_steps=3, eval_every=0, save_every=2)]) == 0
    # wandb's service may still hold the records after run.finish(); the CLI's process exit tears it down
    # (wandb's atexit hook), which flushes them: do the same here before reading the file
    import wandb

    wandb.teardown()
    run_id = json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())["trackers"]["wandb_run_id"]
    (record,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = record.read_bytes()
    for text in (b"train/loss", b"eval/loss", b"wandb_offline", b"total_steps"):
        assert text in data, text


def test_tracker_errors_are_one_line_with_the_fix(workspace, monkeypatch, capsys):
    out = workspace / "bad"
    assert main(["train", _config(workspace, out, report_to=["tensorboard", "tensorboard"])]) == 2
    assert "train.report_to = ['tensorboard', 'tensorboard']: tensorboard is listed twice" in capsys.readouterr().err
    assert main(["train", _config(workspace, out, report_to="mlflow")]) == 2
    assert "train.report_to = 'mlflow': unknown tracker 'mlflow'; use tensorboard, wandb (or none)" in capsys.readouterr().err
    from lorakit import tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    assert main(["train", _config(workspace, out, report_to=["wandb"])]) == 2
    assert "train.report_to = ['wandb']: wandb is not installed; pip install wandb (lorakit's `wandb` extra)" in capsys.readouterr().err
    monkeypatch.undo()
    fake = FakeWandb(fail=RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore"))
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    assert main(["train", _config(workspace, out, report_to="wandb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb did not start (RuntimeError: api_key not configured (no-tty)" in err
    assert "set WANDB_MODE=offline" in err
    blocked = workspace / "blocked"
    blocked.mkdir()
    (blocked / "tensorboard").write_text("a file where the event files go")
    assert main(["train", _config(workspace, blocked, report_to="tensorboard")]) == 2
    assert "train.report_to: tensorboard cannot write" in capsys.readouterr().err
    assert main(["train", _config(workspace, workspace / "none", report_to="none", max_steps=1, eval_every=0)]) == 0
    assert not (workspace / "none" / "tensorboard").exists() and not (workspace / "none" / "wandb").exists()
