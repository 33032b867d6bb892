"""Transactional writes: every file and directory q4lab writes goes through this module.

How and why: docs/data-safety.md. In short, after any failure (full disk, permission error, a rename
across filesystems, an exception, SIGTERM, SIGKILL, power loss after the last fsync) the
destination holds either its old content or the complete new one, never a mix, and nothing of
q4lab's is left behind once the next q4lab write (or :func:`recover`) has run:

- :func:`replace_file` (``q4lab.save``, single adapter files): the new file is written beside the
  old one under a temporary name, fsynced, and ``os.replace``-d over it (POSIX ``rename(2)`` is
  atomic), then the directory is fsynced.
- :func:`write_directory` (``save_pretrained``, ``quantize_checkpoint``, PEFT adapter directories,
  the CLI): a new destination is built as a temporary directory beside it and renamed into place
  in one step. An existing destination is never renamed or staged outside itself (it may be a
  mount point, W1 in docs/data-safety.md): the new files are staged in a temporary directory
  *inside* it, fsynced, and swapped in by renames after a journal names what moves; the old
  model's files go into the same temporary directory and are deleted only after the swap is
  complete and fsynced. A failure during the swap moves everything back (:func:`recover` does the
  same after a crash, reading the journal).
- Temporaries are named ``.q4lab-tmp-<pid>-<process start time>-<random>``: the start time
  (``/proc/<pid>/stat`` field 22) tells a dead writer from a live one that reuses its pid, so
  stale temporaries are removed (or rolled back) and a live writer's never are. While a write is
  in progress SIGTERM aborts it like an exception (the handler is installed only for the write and
  the previous one restored, then called).

The same rules as transformers' ``save_pretrained`` for permissions (directories and files follow
the umask: 0755 / 0644 under umask 022) and for what "the old model" is (``MODEL_FILES``).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".q4lab-tmp-"
_TEMP = re.compile(r"^\.q4lab-tmp-(\d+)-(\d+)-[0-9a-f]{8}$")
_JOURNAL, _COMMITTED, _NEW, _OLD = "journal.json", "COMMITTED", "new", "old"
_ACTIVE: set = set()  # this process's temporaries still in use (the others of its pid are stale)

#: Files of a transformers model directory that a new save replaces or removes (transformers'
#: weight, shard and index names, and the configs q4lab writes); anything else is the user's.
MODEL_FILES = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)"
                         r"|(model\.safetensors|pytorch_model\.bin)\.index\.json"
                         r"|config\.json|generation_config\.json")
#: Files of a PEFT adapter directory (``adapter_model.safetensors`` / ``.bin``, its config).
ADAPTER_FILES = re.compile(r"adapter_model\.(safetensors|bin)|adapter_config\.json")


class DestinationExistsError(FileExistsError):
    """The destination exists and holds files; ``overwrite`` was not given. ``destination`` is
    its path (the CLI names its own ``--overwrite`` flag)."""

    def __init__(self, destination: Path):
        self.destination = destination
        super().__init__(f"{destination} exists and is not empty; choose another destination or "
                         f"pass overwrite=True (the old model's files are replaced, other files "
                         f"in it are kept)")


class Terminated(BaseException):
    """SIGTERM arrived while q4lab was writing; raised to unwind and clean up (then the signal's
    previous disposition is applied)."""


# ---- who owns a temporary --------------------------------------------------------------------
def _start_time(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    -1 if there is no such process, 0 where /proc does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        if not os.path.isdir("/proc/self"):
            return 0 if _pid_exists(pid) else -1
        return -1
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields 3.. follow "(comm) "


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name() -> str:
    """A fresh temporary name naming this process (pid and start time), registered as in use
    until :func:`_release`."""
    pid = os.getpid()
    name = f"{TEMP_PREFIX}{pid}-{max(_start_time(pid), 0)}-{secrets.token_hex(4)}"
    _ACTIVE.add(name)
    return name


def _release(path: Path) -> None:
    _ACTIVE.discard(path.name)


def _owner_alive(name: str) -> bool:
    m = _TEMP.match(name)
    pid, start = int(m.group(1)), int(m.group(2))
    if pid == os.getpid() and start == max(_start_time(pid), 0):
        return name in _ACTIVE
    now = _start_time(pid)
    return now >= 0 and (now == start or now == 0 or start == 0)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of q4lab's temporary files or directories."""
    return _TEMP.match(name) is not None


# ---- fsync ------------------------------------------------------------------------------------
def fsync_path(path) -> None:
    """fsync one file or directory (directories: so that renames and new entries are durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * os.path.isdir(path))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path) -> None:
    """Give a file the mode a plain ``open`` gives (0o666 minus the umask: 0644 under 022).
    safetensors' ``save_file`` creates 0600 files; transformers users expect 0644."""
    os.chmod(path, 0o666 & ~_umask())


# ---- checks -------------------------------------------------------------------------------------
def check_separate(source, destination) -> None:
    """ValueError if ``destination`` is ``source``, inside it, or contains it (after resolving
    symlinks): writing there would replace or delete the data being read."""
    src, dst = Path(source).resolve(), Path(destination).resolve()
    if dst == src:
        raise ValueError(f"destination {destination} is the source {source}; write to another "
                         f"directory")
    if src in dst.parents:
        raise ValueError(f"destination {destination} is inside the source {source} ({dst}); "
                         f"write to a directory outside it")
    if dst in src.parents:
        raise ValueError(f"destination {destination} contains the source {source} ({src}); "
                         f"replacing it would delete the source: write to a directory beside it")


# ---- SIGTERM while writing ----------------------------------------------------------------------
@contextmanager
def _terminate_cleans_up():
    """While the body runs, SIGTERM raises :class:`Terminated` (so ``except BaseException``
    cleanup runs); afterwards the previous handler is back and, if the signal came, applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, previous)
        if previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGTERM)  # die by the signal, as without q4lab
        elif callable(previous):
            previous(signal.SIGTERM, None)
        raise InterruptedError("SIGTERM interrupted the write; the destination was left as it "
                               "was") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- stale temporaries and recovery -------------------------------------------------------------
def recover(directory) -> list[str]:
    """Remove the temporaries of dead q4lab writers in ``directory``; a swap a dead writer left
    half done is rolled back (or, if it had committed, finished) first, so ``directory`` holds its
    old or its new content. A live writer's temporaries are left alone. Returns the names
    removed. Every q4lab writer calls this on the destination and its parent before writing."""
    directory = Path(directory)
    try:
        names = [n for n in os.listdir(directory) if _TEMP.match(n)]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []  # nothing there, or nothing q4lab could have written there
    removed = []
    for name in names:
        if _owner_alive(name):
            continue
        path = directory / name
        try:
            if path.is_dir() and os.path.lexists(path / _JOURNAL):
                _roll_back(directory, path)
            else:
                _remove(path)
        except FileNotFoundError:
            continue  # another process cleaned it meanwhile
        except PermissionError as exc:
            raise PermissionError(f"{path} is a temporary left by a q4lab writer that died; it "
                                  f"cannot be removed ({exc.strerror}): remove it with the "
                                  f"permissions of its owner") from exc
        removed.append(name)
    return removed


def _roll_back(destination: Path, stage: Path) -> None:
    """Undo the swap recorded in ``stage``'s journal: the new files that were moved into
    ``destination`` go back into the stage, the old ones back into ``destination``; if the swap
    had committed, the old files are deleted instead. Idempotent, so a crash during a roll-back
    is rolled back again by the next :func:`recover`. Then ``stage`` is removed."""
    if not (stage / _COMMITTED).exists():
        try:
            journal = json.loads((stage / _JOURNAL).read_text())
        except (OSError, ValueError):
            journal = {"new": []}  # written by rename: absent means nothing moved yet
        for name in journal.get("new", []):
            if not os.path.lexists(stage / _NEW / name) and os.path.lexists(destination / name):
                os.rename(destination / name, stage / _NEW / name)  # moved in: take it back
        old = stage / _OLD
        if old.is_dir():
            for name in os.listdir(old):
                os.rename(old / name, destination / name)
        fsync_path(destination)
    _discard(stage)


def _discard(stage: Path) -> None:
    """Delete a finished (committed or rolled back) stage: its journal first, so that a crash
    while deleting leaves a plain stale temporary, never a half-deleted journalled one."""
    if os.path.lexists(stage / _JOURNAL):
        os.unlink(stage / _JOURNAL)
        fsync_path(stage)
    shutil.rmtree(stage, ignore_errors=True)


# ---- single files -------------------------------------------------------------------------------
@contextmanager
def replace_file(path):
    """Yield a temporary path beside ``path``; when the body returns, the file written there is
    fsynced and renamed over ``path`` (atomic). On any failure it is removed and ``path`` keeps
    its old content."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {parent} does not exist; create "
                                f"it first (os.makedirs) or choose another path")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the file {path}: it is a directory; give a file "
                                f"name ending in .safetensors")
    with _terminate_cleans_up():
        recover(parent)
        tmp = parent / temp_name()
        try:
            yield tmp
            if not tmp.is_file():
                raise RuntimeError(f"internal error: nothing was written to {tmp}")
            follow_umask(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(parent)
        except BaseException:
            if os.path.lexists(tmp):
                _remove(tmp)
            raise
        finally:
            _release(tmp)


# ---- directories --------------------------------------------------------------------------------
def _make_parents(directory: Path) -> list[Path]:
    """mkdir ``directory`` and its missing parents (mode from the umask); the ones created,
    outermost first, so a failed write can remove them again."""
    missing = []
    while not directory.exists():
        if os.path.lexists(directory):
            raise FileNotFoundError(f"{directory} is a broken symbolic link")
        missing.append(directory)
        directory = directory.parent
    if not directory.is_dir():
        raise NotADirectoryError(f"cannot create a directory under {directory}: it is a file")
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        created.append(d)
    return created


def _make_temp_dir(parent: Path) -> Path:
    path = parent / temp_name()
    os.mkdir(path)  # 0o777 & ~umask, as transformers' os.makedirs
    return path


def _is_empty(directory: Path) -> bool:
    return not any(not _TEMP.match(n) for n in os.listdir(directory))


@contextmanager
def write_directory(destination, *, overwrite: bool, owned=MODEL_FILES, source=None):
    """Yield an empty directory to write the new content of ``destination`` into; when the body
    returns, it becomes ``destination`` (see the module docstring). ``destination`` may exist only
    if it is empty or ``overwrite``; then the files written replace those of the same name, the
    files whose names ``owned`` matches (the old model's) are removed, every other file is kept.
    ``source``: a directory being read, which ``destination`` must not be, be inside or contain.
    On any failure ``destination`` is as it was and no temporary and no created folder is left."""
    destination = Path(os.path.abspath(destination))
    if source is not None:
        check_separate(source, destination)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{destination} exists and is a file, not a directory; choose "
                              f"another destination")
    with _terminate_cleans_up():
        created = _make_parents(destination.parent)
        try:
            recover(destination.parent)
            if destination.is_dir():
                recover(destination)
                if not overwrite and not _is_empty(destination):
                    raise DestinationExistsError(destination)
                yield from _into_existing(destination, owned)
            else:
                stage = _make_temp_dir(destination.parent)
                try:
                    yield stage
                    fsync_tree(stage)
                    os.rename(stage, destination)
                    fsync_path(destination.parent)
                except BaseException:
                    if stage.exists():
                        shutil.rmtree(stage, ignore_errors=True)
                    raise
                finally:
                    _release(stage)
        except BaseException:
            for d in reversed(created):
                try:
                    os.rmdir(d)
                except OSError:
                    break
            raise


def _into_existing(destination: Path, owned):
    stage = _make_temp_dir(destination)
    new = stage / _NEW
    swapping = False
    try:
        os.mkdir(new)
        yield new
        fsync_tree(new)
        swapping = True
        _swap(destination, stage, owned)
    except BaseException:
        if swapping:
            _roll_back(destination, stage)  # if this fails the stage stays for recover()
        elif stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        _release(stage)


def _swap(destination: Path, stage: Path, owned) -> None:
    new_names = sorted(os.listdir(stage / _NEW))
    old_names = sorted(n for n in os.listdir(destination)
                       if not _TEMP.match(n) and (n in new_names or owned.fullmatch(n)))
    tmp = stage / (_JOURNAL + ".part")
    with open(tmp, "w") as f:
        json.dump({"new": new_names, "old": old_names}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, stage / _JOURNAL)
    os.mkdir(stage / _OLD)
    fsync_path(stage)
    for name in old_names:
        os.rename(destination / name, stage / _OLD / name)
    for name in new_names:
        os.rename(stage / _NEW / name, destination / name)
    fsync_path(destination)
    with open(stage / _COMMITTED, "w") as f:
        os.fsync(f.fileno())
    fsync_path(stage)
    try:  # the old model's files, only now; what cannot be deleted stays for the next recover()
        _discard(stage)
    except OSError:
        pass
