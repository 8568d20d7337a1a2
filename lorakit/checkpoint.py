"""Training checkpoints: everything needed to resume a run exactly.

    checkpoints/step-<N>/
        adapter/            the adapter in PEFT format (loadable on its own)
        optimizer.pt        optimizer state (tensors; loaded with weights_only=True, never unpickled freely)
        rng.pt              torch CPU (and CUDA) RNG states, same loading rule
        state.json          step, data-stream position, scheduler step, run fingerprint
        best_adapter/       train.save_best: the best adapter as it was at this step

Each checkpoint is built under a temporary name and renamed into place, so a crash mid-write
never leaves a half checkpoint that looks complete; only the newest `keep` are kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lorakit.adapters import link_tree, new_folder, remove_dead_stagings, replace_dir, save_adapter
from lorakit.errors import UserError, writing

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGING = re.compile(r"\.step-\d+\.tmp-(\d+)-")  # a checkpoint being written or pruned, by its process's id


def checkpoint_dirs(output_dir: Union[str, Path]) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Union[str, Path]) -> Optional[Path]:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def set_aside_checkpoint(output_dir: Union[str, Path], step: int) -> Optional[Path]:
    """Rename checkpoints/step-<step> to diverged-step-<step>, where `--resume` no longer picks it
    (a run resumed from it would rerun the same batch on the same weights); None if it is not there."""
    path = Path(output_dir) / "checkpoints" / f"step-{step}"
    if not path.is_dir():
        return None
    aside = path.with_name(f"diverged-step-{step}")
    staging = path.with_name(f".diverged-step-{step}.tmp-{os.getpid()}")
    os.replace(path, staging)  # out of --resume's sight at once, then into place (an older one of that step replaced)
    replace_dir(staging, aside)
    return aside


def save_checkpoint(
    output_dir: Union[str, Path],
    step: int,
    *,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    base_model_name_or_path: Optional[str] = None,
    revision: Optional[str] = None,
    adapter_files: Optional[dict[str, str]] = None,
    folders: Optional[dict[str, Path]] = None,
) -> Path:
    """Write checkpoints/step-<step>/ atomically and prune to the newest `keep`; adapter_files:
    text files written into its adapter folder too (a chat template); folders: flat folders kept
    in it as they are now, by name (the best adapter so far), hard-linked where the file system can."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_stagings(root, _STAGING)
    final = root / f"step-{step}"
    staging = new_folder(prefix=f".step-{step}.tmp-{os.getpid()}-", parent=root)
    try:
        save_adapter(model, staging / "adapter", base_model_name_or_path=base_model_name_or_path, revision=revision,
                     extra_files=adapter_files)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        for name, value in (("optimizer.pt", optimizer_state), ("rng.pt", rng)):
            # through a file object: torch.save to a path says a full disk as "unexpected pos 576 vs
            # 534", through Python's file its OSError (errno 28) comes out, which the CLI says as one
            with writing(staging / name), open(staging / name, "wb") as f:
                torch.save(value, f)
        for name, folder in (folders or {}).items():
            link_tree(folder, staging / name)
        with writing(staging / "state.json"):
            (staging / "state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in [p for p in checkpoint_dirs(output_dir) if _same_run(p, state)][:-keep]:
        # out of --resume's sight at once, under a staging name: a kill halfway through removing it
        # leaves a folder the next save sweeps, not a step-N without its state.json that stays for good
        doomed = old.with_name(f".{old.name}.tmp-{os.getpid()}-pruned")
        with contextlib.suppress(OSError):
            os.replace(old, doomed)
            old = doomed
        shutil.rmtree(old, ignore_errors=True)
    return final


def _same_run(checkpoint: Path, state: dict[str, Any]) -> bool:
    """Whether `checkpoint` was written by the run now saving `state` (the same fingerprint): only
    those are pruned. `checkpoints/` may be a link to another disk, and one planted in a shared run
    folder could point at another run's checkpoints, which pruning would delete."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("fingerprint") == state.get("fingerprint")


class RunFolderLock:
    """One training run at a time in an output folder: an exclusive flock on `output_dir/.lorakit-run.lock`,
    which holds its holder's process id. Two runs writing one folder would interleave their metrics
    and prune and replace each other's checkpoints; the second is refused instead. The kernel drops
    the lock when its holder ends, however it ends. Where there is no flock (Windows, a file system
    without locks) runs are not kept apart.

    The file goes when the lock is released: a process that opened it meanwhile locks a file no
    longer in the folder, sees that, and tries again with the folder's new one."""

    NAME = ".lorakit-run.lock"

    def __init__(self, output_dir: Path, file: Any, made: list[Path]):
        self.output_dir, self._file, self._made = output_dir, file, made

    @classmethod
    def take(cls, output_dir: Union[str, Path]) -> "RunFolderLock":
        """Raises:
        UserError: another process (or an earlier run of this one not closed) holds the folder."""
        output_dir = Path(output_dir)
        made = [p for p in (output_dir, *output_dir.parents) if not p.exists()]  # what mkdir makes, innermost first
        try:
            import fcntl
        except ImportError:
            output_dir.mkdir(parents=True, exist_ok=True)
            return cls(output_dir, None, made)
        path = output_dir / cls.NAME
        while True:
            output_dir.mkdir(parents=True, exist_ok=True)
            try:
                file = _open_lock_file(path)
            except FileNotFoundError:  # the folder went meanwhile (a run that made it failed): again
                continue
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = _process(file.read().strip())
                file.close()
                raise in_use_error(output_dir, holder) from None
            except OSError:  # no locks on this file system
                file.close()
                return cls(output_dir, None, made)
            try:
                if os.lstat(path).st_ino == os.fstat(file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            file.close()  # released by its holder (and removed) while we opened it: take the new one
        lock = cls(output_dir, file, made)
        try:
            with writing(path):
                file.seek(0)
                file.truncate()
                file.write(f"{os.getpid()}\n")
                file.flush()
        except BaseException:
            lock.release(failed=True)
            raise
        return lock

    def release(self, *, failed: bool = False) -> None:
        """Let the folder go; with `failed` (the run stopped before writing anything) the folders the
        lock made are removed again, where empty, as if the run had never started."""
        if self._file is not None:
            (self.output_dir / self.NAME).unlink(missing_ok=True)  # while held: no one locks the old file for good
            self._file.close()
            self._file = None
        if failed:
            for folder in self._made:
                try:
                    folder.rmdir()
                except OSError:  # not empty: something was written after all, or another run's
                    break
        self._made = []


def _open_lock_file(path: Path, *, create: bool = True) -> Any:
    """The lock file, opened for reading and appending (made where missing), or with `create` False
    for reading only, without following a symbolic link: a link planted there (a shared or copied
    run folder) would have the process id written over the file it points at.

    Raises:
        UserError: the name is a symbolic link or not a plain file.
    """
    # (O_NONBLOCK: a FIFO there would block the open; it is then refused as not a plain file)
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UserError(f"{path} is a symbolic link; lorakit writes its run's process id there, never through a "
                        "link: remove it") from None  # fmt: skip
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a plain file; lorakit keeps its run lock there: remove it")
    return os.fdopen(fd, "a+" if create else "r")


def in_use_error(output_dir: Union[str, Path], holder: str) -> UserError:
    return UserError(f"output_dir {str(output_dir)!r} is in use by another training run ({holder}); wait for it to "
                     "end, or set a new output_dir=...")  # fmt: skip


def folder_holder(output_dir: Union[str, Path]) -> Optional[str]:
    """Who holds `output_dir` for a run ("process 123"), or None; takes nothing and writes nothing."""
    path = Path(output_dir) / RunFolderLock.NAME
    try:
        import fcntl

        file = _open_lock_file(path, create=False)
    except (ImportError, OSError, UserError):  # (a link there: refused when the run takes the lock)
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _process(file.read().strip())
        except OSError:
            return None
    return None


def _process(holder: str) -> str:
    if holder == str(os.getpid()):
        return "this process: an earlier run in it that was not closed, Run.close()"
    return f"process {holder}" if holder.isdigit() else "a process"


def load_checkpoint(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(state, optimizer_state, rng) of a checkpoint folder; tensors load with weights_only=True."""
    path = Path(path)
    name = "state.json"
    try:
        state = json.loads((path / name).read_text())
        name = "optimizer.pt"
        optimizer_state = torch.load(path / name, weights_only=True, map_location="cpu")
        name = "rng.pt"
        rng = torch.load(path / name, weights_only=True, map_location="cpu")
        problem = _layout_problem(state, optimizer_state, rng)
    except pickle.UnpicklingError:  # (its message suggests weights_only=False: never for a file we cannot trust)
        problem = f"{name} holds no tensors lorakit wrote"
    except (OSError, ValueError, RuntimeError) as exc:  # (ValueError: invalid JSON or UTF-8 too)
        problem = f"{name}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem:
        raise UserError(f"checkpoint {path} is damaged ({problem}); delete it to resume from an older one")
    return state, optimizer_state, rng


def _layout_problem(state: Any, optimizer_state: Any, rng: Any) -> Optional[str]:
    """What in a checkpoint's files is not what `save_checkpoint` writes, or None."""
    if not isinstance(state, dict) or not _is_step(state.get("step")):
        return "state.json holds no step number"
    missing = [k for k in ("scheduler", "stream") if not isinstance(state.get(k), dict)]
    if missing:
        return f"state.json lacks {missing[0]}"
    if not isinstance(optimizer_state, dict) or not {"state", "param_groups"} <= optimizer_state.keys():
        return "optimizer.pt holds no optimizer state"
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        return "rng.pt holds no random-number state"
    return None


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
