"""The three descriptions of the environment agree: pyproject.toml, environment.yml, requirements.lock."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement string (PEP 503)."""
    name = re.split(r"[\s;<>=!~\[@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pyproject_requirements() -> list[str]:
    project = _pyproject()
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return reqs


def _conda_pip_requirements() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return [r for r in pip_section if not r.startswith("-")]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.split(";")[0].partition("==")
            pins[_name(name)] = version.strip()
    return pins


def test_environment_yml_names_the_same_packages_as_pyproject():
    assert sorted(map(_name, _conda_pip_requirements())) == sorted(map(_name, _pyproject_requirements()))


def test_environment_yml_uses_the_same_specifiers():
    def spec(r):
        return re.sub(r"\s+", "", r).replace('"', "'")

    assert sorted(map(spec, _conda_pip_requirements())) == sorted(map(spec, _pyproject_requirements()))


def test_environment_yml_pins_python_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11.7" in env["dependencies"]
    assert _pyproject()["requires-python"] == ">=3.11,<3.12"


def test_lock_pins_every_direct_dependency_exactly():
    pins = _lock()
    missing = sorted({_name(r) for r in _pyproject_requirements()} - set(pins))
    assert not missing, f"requirements.lock lacks {missing}: run `make lock`"
    assert pins["torch"] == "2.13.0"
    assert pins["triton"] == "3.7.1"
    bad = [name for name, v in pins.items() if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", v)]
    assert not bad, f"every lock line must be name==version; not pinned: {bad}"


def test_lock_satisfies_pyproject_specifiers():
    from packaging.requirements import Requirement

    pins = _lock()
    for r in _pyproject_requirements():
        req = Requirement(r)
        assert req.specifier.contains(pins[_name(r)], prereleases=True), f"{pins[_name(r)]} violates {r}"


def test_jupyter_book_is_1x():
    pins = _lock()
    assert pins["jupyter-book"].startswith("1."), "Jupyter Book 2 fetches its theme online at build time"
