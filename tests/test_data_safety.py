"""Writes that never lose data, reads that never accept garbage (docs/data-safety.md, issue 19).

Claims, each on real files (a tiny Llama, tests/test_stream.py's ``write_llama``), real processes
and real signals; failures are injected into the real ``os.rename`` / ``os.replace`` / ``os.mkdir``
/ file ``write`` calls at every point a write passes through:
- W1 a failure at any rename of a save into an existing model directory (EXDEV, ENOSPC, EACCES)
  leaves the old model byte for byte and no temporary; a destination on its own filesystem (a
  real tmpfs mount point, where the test may mount) is replaced in place;
- W2 a destination that is the source, inside it or contains it (also through a symlink) is
  refused before anything is written; W3 a failed ``load_adapters`` leaves the model as it was;
- W4 directories 0755 / files 0644 under umask 022; W5 SIGTERM and SIGKILL at random points of a
  streaming quantization, then a second run: old or new model, never a mix, no temporary left;
  a dead writer's temporaries are removed, a live one's kept; W6 NaN / Inf / negative statistics
  are refused by ``from_pretrained``; W7 ``max_shard_size`` 0 refused; W8 a save removes the old
  model's files and keeps the user's; W9 no folder created by a failed write is left;
- the unclear errors of issue 19 name the problem and the fix; the CLI prints one line.
The >= 1 GB version of the kill test is tools/kill_test.py.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import q4lab
from q4lab.formats import atomic, shards

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from test_stream import write_llama  # noqa: E402  (the suite's tiny Llama checkpoint)

CFG = q4lab.Q4Config(min_numel=0, compute_dtype=torch.float32)


def snapshot(directory: Path) -> dict:
    """{relative path: sha256} of every file under ``directory`` (the bytes that must survive)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list:
    return sorted(str(p) for p in root.rglob(".q4lab-tmp-*"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("src") / "llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def models(source):
    """Two different quantized models (A: nf4, B: fp4 blocksize 128) of the tiny Llama."""
    a = q4lab.quantize_model(AutoModelForCausalLM.from_pretrained(str(source)), CFG,
                             progress=False)
    b = q4lab.quantize_model(AutoModelForCausalLM.from_pretrained(str(source)), CFG,
                             quant_type="fp4", blocksize=128, progress=False)
    return a, b


@pytest.fixture
def old_model_dir(models, tmp_path):
    """A directory holding model B in 5 shards plus a file of the user's."""
    out = tmp_path / "models" / "mine"
    q4lab.save_pretrained(models[1], out, max_shard_size="30KB", progress=False)
    (out / "notes.txt").write_text("the user's own file")
    return out


class Inject:
    """Wraps ``os.rename`` and ``os.replace`` (one count for both): the ``fail_at``-th call raises
    ``OSError(err)`` (or each of a set of calls), every other call is the real one."""

    def __init__(self, monkeypatch, fail_at=(), err=errno.EXDEV):
        self.calls, self.err = 0, err
        self.fail_at = {fail_at} if isinstance(fail_at, int) else set(fail_at)
        for name in ("rename", "replace"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real):
        def call(src, dst, *args, **kwargs):
            self.calls += 1
            if self.calls in self.fail_at:
                raise OSError(self.err, os.strerror(self.err), str(src))
            return real(src, dst, *args, **kwargs)
        return call


# ---- W1, W8, W9: failures at every rename leave the old content ---------------------------------
def test_save_pretrained_failing_at_every_rename_keeps_the_old_model(models, old_model_dir,
                                                                     monkeypatch):
    before = snapshot(old_model_dir)
    with monkeypatch.context() as m:
        counter = Inject(m)
        q4lab.save_pretrained(models[0], old_model_dir.parent / "probe", progress=False)
        q4lab.save_pretrained(models[0], old_model_dir.parent / "probe", max_shard_size="20KB",
                              progress=False)
    renames = counter.calls
    shutil.rmtree(old_model_dir.parent / "probe")
    assert renames > 10
    for k in range(1, renames + 1):
        err = (errno.EXDEV, errno.ENOSPC, errno.EACCES)[k % 3]
        with monkeypatch.context() as m:
            Inject(m, fail_at=k, err=err)
            with pytest.raises(OSError) as info:
                q4lab.save_pretrained(models[0], old_model_dir, max_shard_size="20KB",
                                      progress=False)
            assert info.value.errno == err
        assert snapshot(old_model_dir) == before, f"rename {k} failing changed the old model"
        assert temporaries(old_model_dir.parent) == []
    q4lab.save_pretrained(models[0], old_model_dir, progress=False)  # W8: B's files all gone
    assert sorted(p.name for p in old_model_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "notes.txt"]
    assert json.loads((old_model_dir / "config.json").read_text())["quantization_config"][
        "bnb_4bit_quant_type"] == "nf4"


def test_a_roll_back_that_fails_midway_is_finished_by_the_next_run(models, old_model_dir,
                                                                  monkeypatch):
    """A rename fails inside the swap, then a rename of the roll-back fails too: the journalled
    temporary stays, and the next q4lab run (recover) restores the old model exactly."""
    before = snapshot(old_model_dir)
    with monkeypatch.context() as m:
        counter = Inject(m)
        q4lab.save_pretrained(models[0], old_model_dir.parent / "probe", max_shard_size="20KB",
                              progress=False)
    journal = counter.calls  # the shard renames, then (here: the stage's) one more
    old_files = len([n for n in before if n != "notes.txt"])
    for k in (journal + 3, journal + old_files + 3):  # moving the old files out; the new in
        with monkeypatch.context() as m:
            Inject(m, fail_at={k, k + 2}, err=errno.EIO)
            with pytest.raises(OSError):
                q4lab.save_pretrained(models[0], old_model_dir, max_shard_size="20KB",
                                      progress=False)
        assert temporaries(old_model_dir), k
        atomic.recover(old_model_dir)
        assert snapshot(old_model_dir) == before and temporaries(old_model_dir.parent) == []


def test_destination_on_another_filesystem_is_written_in_place(models, old_model_dir,
                                                               monkeypatch):
    """W1 without privileges: every rename that crosses the destination's boundary fails with
    EXDEV, as it does when the destination is a mount point. The save still succeeds: nothing is
    staged outside the destination."""
    real = {n: getattr(os, n) for n in ("rename", "replace")}
    inside = str(old_model_dir) + os.sep

    def same_fs_only(name):
        def call(src, dst, *args, **kwargs):
            if not (str(src).startswith(inside) and str(dst).startswith(inside)):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
            return real[name](src, dst, *args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(os, name, same_fs_only(name))
    q4lab.save_pretrained(models[0], old_model_dir, progress=False)
    monkeypatch.undo()
    assert (old_model_dir / "notes.txt").read_text() == "the user's own file"
    assert not (old_model_dir / "model.safetensors.index.json").exists()
    assert temporaries(old_model_dir.parent) == []
    assert isinstance(q4lab.from_pretrained(old_model_dir, progress=False), torch.nn.Module)


def test_write_and_mkdir_failures_keep_old_content_and_leave_no_folders(source, old_model_dir,
                                                                         monkeypatch):
    """ENOSPC in the middle of writing a shard, EACCES creating the staging folder: the old
    model stays; a failed write into new nested folders removes the folders it created (W9)."""
    before = snapshot(old_model_dir)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.left = f, 30_000

        def write(self, data):
            self.left -= len(data)
            if self.left < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(shards, "open", lambda *a, **k: FullDisk(real_open(*a, **k)),
                        raising=False)
    with pytest.raises(OSError, match="No space left"):
        q4lab.quantize_checkpoint(source, old_model_dir, CFG, overwrite=True, progress=False)
    fresh = old_model_dir.parent / "new" / "deeper" / "out"
    with pytest.raises(OSError, match="No space left"):
        q4lab.quantize_checkpoint(source, fresh, CFG, progress=False)
    monkeypatch.undo()
    assert not (old_model_dir.parent / "new").exists()
    real_mkdir = os.mkdir

    def no_permission(path, *args, **kwargs):
        if Path(path).name.startswith(".q4lab-tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", no_permission)
    with pytest.raises(PermissionError):
        q4lab.quantize_checkpoint(source, old_model_dir, CFG, overwrite=True, progress=False)
    with pytest.raises(PermissionError):
        q4lab.quantize_checkpoint(source, fresh, CFG, progress=False)
    monkeypatch.undo()
    assert not (old_model_dir.parent / "new").exists()
    assert snapshot(old_model_dir) == before and temporaries(old_model_dir.parent) == []


def test_single_files_are_replaced_atomically(models, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    q4lab.save(models[1], path)
    before = path.read_bytes()
    with monkeypatch.context() as m:
        Inject(m, fail_at=1, err=errno.ENOSPC)
        with pytest.raises(OSError):
            q4lab.save(models[0], path)
    assert path.read_bytes() == before and temporaries(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        q4lab.save(models[0], tmp_path / "missing" / "m.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        q4lab.save(models[0], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ---- W2, W4, W7 ---------------------------------------------------------------------------------
def test_destination_that_is_contains_or_is_inside_the_source_is_refused(source, tmp_path):
    src = shutil.copytree(source, tmp_path / "models" / "llama")
    (tmp_path / "link").symlink_to(src)
    before = snapshot(tmp_path / "models")
    cases = [(tmp_path / "models", "contains the source"), (src, "is the source"),
             (src / "q4", "is inside the source"), (tmp_path / "link", "is the source"),
             (tmp_path / "link" / "q4", "is inside the source")]
    for dst, message in cases:
        with pytest.raises(ValueError, match=message):
            q4lab.quantize_checkpoint(src, dst, CFG, overwrite=True, progress=False)
    assert snapshot(tmp_path / "models") == before and not (src / "q4").exists()


def test_modes_follow_the_umask_and_shard_size_must_be_positive(source, models, tmp_path):
    old = os.umask(0o022)
    try:
        q4lab.quantize_checkpoint(source, tmp_path / "a" / "q", CFG, progress=False)
        q4lab.save_pretrained(models[0], tmp_path / "b", progress=False)
        q4lab.save(models[0], tmp_path / "c.safetensors")
        lora = q4lab.add_lora(_copy(models[0]), r=2)
        q4lab.save_adapters(lora, tmp_path / "d")
        q4lab.save_adapters(lora, tmp_path / "e.safetensors")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "q", tmp_path / "b", tmp_path / "d"):
        assert d.stat().st_mode & 0o777 == 0o755, d
    for f in [*(tmp_path / "a" / "q").iterdir(), *(tmp_path / "b").iterdir(),
              *(tmp_path / "d").iterdir(), tmp_path / "c.safetensors", tmp_path / "e.safetensors"]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    for size in ("0MB", 0, "0.0001KB"):
        with pytest.raises(ValueError, match="at least 1 byte"):
            q4lab.save_pretrained(models[0], tmp_path / "f", max_shard_size=size)
    assert not (tmp_path / "f").exists()


# ---- W3 ------------------------------------------------------------------------------------------
def test_failed_load_adapters_leaves_the_model_as_it_was(models, tmp_path):
    donor = q4lab.add_lora(_copy(models[0]), r=4, target_modules=("q_proj", "v_proj"))
    q4lab.save_adapters(donor, tmp_path / "adapters")
    model = _copy(models[0])
    model.model.layers[1].self_attn.v_proj = q4lab.quantize_model(
        torch.nn.Sequential(torch.nn.Linear(64, 48)), CFG, progress=False)[0]  # other shape
    names = [n for n, _ in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="shape"):
        q4lab.load_adapters(model, tmp_path / "adapters")
    assert [n for n, _ in model.named_modules()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not q4lab.lora.lora_layers(model)


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ---- W5: signals, stale temporaries -------------------------------------------------------------
ZYGOTE = """
import ctypes, os, signal, sys
from pathlib import Path
import torch, q4lab, transformers
import transformers.models.llama.modeling_llama  # imported once here, not in every child
torch.set_num_threads(1)  # no thread pool to inherit: fork-safe, and 2 cores are shared
q4lab.quantize_4bit(torch.ones(64, 64))  # loads the kernels once, before the forks

def quantize(src, dst, quant_type, overwrite=True, shard="20KB"):
    q4lab.quantize_checkpoint(src, dst, q4lab.Q4Config(min_numel=0, quant_type=quant_type),
                              overwrite=overwrite, max_shard_size=shard, progress=False)

def run(src, dst, kill_at):
    if kill_at:  # SIGKILL this process at its kill_at-th rename: a crash inside the swap
        calls, real = [0], os.rename
        def rename(a, b):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(a, b)
        os.rename = rename
    quantize(src, dst, "nf4")

def mounted(src, dst):  # a tmpfs mount point as destination, in a private mount namespace
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 0x40000,
                                                   None) != 0 \
            or libc.mount(b"q4lab", dst.encode(), b"tmpfs", 0, b"size=64m") != 0:
        print("skip", os.strerror(ctypes.get_errno()), flush=True)
        return
    assert os.path.ismount(dst)
    quantize(src, dst, "fp4", overwrite=False)
    Path(dst, "notes.txt").write_text("mine")
    quantize(src, dst, "nf4", shard="5GB")
    names = sorted(os.listdir(dst))
    assert os.path.ismount(dst) and "notes.txt" in names, names
    print("mounted", " ".join(names), flush=True)

for line in sys.stdin:
    what, src, dst, kill_at = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            run(src, dst, int(kill_at)) if what == "run" else mounted(src, dst)
            code = 0
        except BaseException as exc:
            print("error", type(exc).__name__, " ".join(str(exc).split()), flush=True)
            code = 1
        sys.stdout.flush()
        os._exit(code)
    print("pid", pid, flush=True)
    print("status", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """One Python that imports q4lab and transformers once, then forks a real writer process per
    request (``run``: a streaming quantization, ``mount``: the tmpfs case), reporting its pid and
    its exit status: processes without paying the import each time."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def start(self, what, src, dst, kill_at=0) -> int:
        self.proc.stdin.write(f"{what} {src} {dst} {kill_at}\n")
        self.proc.stdin.flush()
        return int(self._expect("pid")[0])

    def status(self) -> tuple[int, list]:
        lines = []
        while True:
            line = self.proc.stdout.readline()
            assert line, "the zygote process died"
            if line.startswith("status "):
                return int(line.split()[1]), lines
            lines.append(line.strip())

    def _expect(self, word):
        line = self.proc.stdout.readline()
        assert line.startswith(word + " "), line
        return line.split()[1:]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _model_files(directory: Path) -> dict:
    return {k: v for k, v in snapshot(directory).items() if k != "notes.txt"}


def test_sigterm_and_sigkill_at_random_points_then_a_second_run(source, tmp_path, zygote):
    """A streaming quantization killed at random moments (SIGTERM: cleaned at once; SIGKILL:
    cleaned by the next q4lab run), and killed inside the swap at a random rename: the
    destination holds the old or the new model, never a mix; a second run completes it."""
    new, dst = tmp_path / "new", tmp_path / "out"
    q4lab.quantize_checkpoint(source, new, q4lab.Q4Config(min_numel=0), max_shard_size="20KB",
                              progress=False)
    q4lab.quantize_checkpoint(source, dst, q4lab.Q4Config(min_numel=0, quant_type="fp4"),
                              max_shard_size="20KB", progress=False)
    (dst / "notes.txt").write_text("mine")
    shutil.copytree(dst, tmp_path / "keep")
    old, fresh = _model_files(dst), _model_files(new)
    assert old != fresh
    zygote.start("run", source, tmp_path / "warm")  # waits for the zygote's imports
    assert zygote.status() == (0, [])
    start = time.perf_counter()
    zygote.start("run", source, dst)
    assert zygote.status() == (0, [])
    duration = time.perf_counter() - start  # one write, fork to exit
    assert _model_files(dst) == fresh
    rng = random.Random(int(os.environ.get("Q4LAB_KILL_SEED", "19")))
    outcomes = []
    for sig in (signal.SIGTERM, signal.SIGKILL) * 3:
        shutil.rmtree(dst)
        shutil.copytree(tmp_path / "keep", dst)
        pid = zygote.start("run", source, dst)
        time.sleep(rng.uniform(0, duration))
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it had finished: the new model
        code, _ = zygote.status()
        outcomes.append((sig.name, code))
        if sig == signal.SIGTERM:  # cleaned up by the process itself
            assert temporaries(tmp_path) == [], (sig, code)
        atomic.recover(dst)  # what every q4lab write and from_pretrained do first
        assert _model_files(dst) in (old, fresh), (sig, code)
        assert (dst / "notes.txt").read_text() == "mine"
        q4lab.quantize_checkpoint(source, dst, q4lab.Q4Config(min_numel=0), overwrite=True,
                                  max_shard_size="20KB", progress=False)
        assert _model_files(dst) == fresh and temporaries(tmp_path) == []
    shutil.rmtree(dst)
    shutil.copytree(tmp_path / "keep", dst)
    kill_at = rng.randint(4, 16)  # past the shard renames, inside the swap's moves
    zygote.start("run", source, dst, kill_at)
    assert zygote.status()[0] == -signal.SIGKILL
    assert temporaries(dst), "the killed swap left its journal for recovery"
    q4lab.from_pretrained(dst, progress=False)  # rolls the half-done swap back first
    assert _model_files(dst) == old and temporaries(tmp_path) == []
    print("kills (signal, exit status):", outcomes, "swap kill at rename", kill_at,
          f"run {duration:.2f} s")


def test_stale_temporaries_of_dead_writers_go_live_ones_stay(models, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    live = subprocess.Popen(["sleep", "60"])
    try:
        start = atomic._start_time(live.pid)
        out = tmp_path / "out"
        q4lab.save_pretrained(models[0], out, progress=False)
        names = {f".q4lab-tmp-{dead}-1-0123abcd": "dead pid",
                 f".q4lab-tmp-{live.pid}-{start + 1}-0123abcd": "pid reused by a later process",
                 f".q4lab-tmp-{live.pid}-{start}-89abcdef": "live writer"}
        for name in names:
            (out / name).mkdir()
            (out / name / "x").write_bytes(b"1" * 100)
            (tmp_path / name).write_bytes(b"2")
        q4lab.save_pretrained(models[1], out, progress=False)
        live_name = f".q4lab-tmp-{live.pid}-{start}-89abcdef"
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live_name]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == \
            [live_name]
    finally:
        live.kill()
        live.wait()


def test_sigterm_handler_is_installed_only_while_writing(models, tmp_path):
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        q4lab.save_pretrained(models[0], tmp_path / "a", progress=False)
        assert signal.getsignal(signal.SIGTERM) is mine and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- W1 for real: a tmpfs mount point as destination -------------------------------------------
def test_real_tmpfs_mount_point_as_destination(source, tmp_path, zygote):
    """The destination is a real mount point (tmpfs in a private mount namespace of a forked
    writer; skipped where mounting is not permitted): an old model there is replaced in place."""
    dst = tmp_path / "mnt"
    dst.mkdir()
    zygote.start("mount", source, dst)
    code, lines = zygote.status()
    if lines and lines[0].startswith("skip"):
        pytest.skip(f"mounting tmpfs is not permitted here: {lines[0]}")
    assert code == 0, lines
    names = lines[0].split()[1:]
    assert names == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"]


# ---- W6: statistics checked before a tensor reaches a model -------------------------------------
def _corrupt(directory: Path, key: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    sd = load_file(str(path))
    sd[key][0] = value
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("double_quant, key, value", [
    (True, "weight.nested_absmax", float("nan")), (True, "weight.nested_absmax", float("inf")),
    (True, "weight.nested_absmax", -1.0), (False, "weight.absmax", float("nan")),
    (False, "weight.absmax", -0.5)])
def test_from_pretrained_refuses_bad_statistics(source, tmp_path, double_quant, key, value):
    out = tmp_path / "q"
    q4lab.quantize_checkpoint(source, out, q4lab.Q4Config(min_numel=0, double_quant=double_quant),
                              progress=False)
    full = f"model.layers.0.mlp.up_proj.{key}"
    _corrupt(out, full, value)
    with pytest.raises(ValueError, match=f"{full}.*NaN, Inf or negative.*corrupted"):
        q4lab.from_pretrained(out, progress=False)
    with pytest.raises(ValueError, match="NaN, Inf or negative"):
        q4lab.load(AutoModelForCausalLM.from_pretrained(str(source)), _single_file(out, tmp_path))


def _single_file(directory, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(directory / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "one.safetensors"))
    return tmp_path / "one.safetensors"


def test_reference_raises_on_non_finite_statistics_instead_of_warning():
    from q4lab import reference as ref

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for double_quant, attr in ((False, "absmax"), (True, "offset"), (True, "nested")):
        packed, state = ref.quantize_4bit(w, 64, double_quant=double_quant)
        if attr == "absmax":
            state.absmax[1] = np.inf
        elif attr == "offset":
            state.offset = np.float32(np.nan)
        else:
            state.state2.absmax[0] = np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="must be finite"):
                ref.dequantize_4bit(packed, state)
            with pytest.raises(ValueError, match="must be finite"):
                ref.matmul_4bit(np.ones((1, 64), np.float32), packed, state)


# ---- unclear errors made clear (issue 19, "Unclear errors") -------------------------------------
def test_cli_errors_are_one_line_without_traceback(source, tmp_path, capsys, monkeypatch):
    from q4lab.__main__ import main

    def run(*args):
        code = main(["quantize", *map(str, args), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("x")
    err = run(source, out)
    assert "pass --overwrite" in err and "overwrite=True" not in err
    bad = shutil.copytree(source, tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    assert "config.json is not a transformers config" in run(bad, tmp_path / "o1")
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": 5,
                                                 "hidden_size": 64}))
    assert "config.json" in run(bad, tmp_path / "o2")
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(os, "mkdir", read_only)
    err = run(source, tmp_path / "ro" / "o3")
    assert "Permission denied" in err and "permissions" in err
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    assert "must differ" not in run(source, source) and "is the source" in run(source, source)
    assert "at least 1 byte" in run(source, tmp_path / "o4", "--max-shard-size", "0MB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]


@pytest.mark.parametrize("key, value, message", [
    ("load_in_4bit", "yes", "load_in_4bit = 'yes' must be true or false"),
    ("bnb_4bit_quant_type", 4, "bnb_4bit_quant_type = 4 must be a string"),
    ("bnb_4bit_quant_type", "int4", "'int4' is not 'nf4' or 'fp4'"),
    ("llm_int8_skip_modules", "lm_head", "must be a list of module names"),
    ("llm_int8_skip_modules", [1], "must list module names"),
    ("bnb_4bit_compute_dtype", 16, "must be a string")])
def test_malformed_quantization_config_types_are_value_errors(source, tmp_path, key, value,
                                                              message):
    out = tmp_path / "q"
    q4lab.quantize_checkpoint(source, out, CFG, progress=False)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"][key] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        q4lab.from_pretrained(out, progress=False)
    config["quantization_config"] = ["not", "an", "object"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="must be a JSON object"):
        q4lab.from_pretrained(out, progress=False)


def test_adapter_numbers_that_are_not_numbers(models, tmp_path):
    lora = q4lab.add_lora(_copy(models[0]), r=2)
    q4lab.save_adapters(lora, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for key, value in (("lora_alpha", "sixteen"), ("r", "8x"), ("lora_dropout", "high"),
                       ("lora_alpha", -1), ("r", 0)):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"adapter_config.json: .*{key}"):
            q4lab.load_adapters(_copy(models[0]), tmp_path / "a")


def test_matmul_and_save_argument_errors(models, tmp_path):
    layer = q4lab.Linear4bit.from_linear(torch.nn.Linear(64, 16))
    with pytest.raises(TypeError, match="state must be the q4lab.QuantState"):
        q4lab.matmul_4bit(torch.randn(2, 64), layer.packed, None)
    meta = torch.empty(2, 64, device="meta")
    with pytest.raises(ValueError, match="x and the weight are on the meta device"):
        q4lab.matmul_4bit(meta, layer.packed.to("meta"), layer.quant_state.to("meta"))
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        q4lab.save_pretrained(models[0], tmp_path / "t", tokenizer=object())
    lora = q4lab.add_lora(_copy(models[0]), r=2)
    with pytest.raises(FileNotFoundError, match="missing does not exist; create it first"):
        q4lab.save_adapters(lora, tmp_path / "missing" / "a.safetensors")
    assert sorted(tmp_path.iterdir()) == []
