"""Every stage's conda env pins the same versions as pyproject.toml (one stack, whichever way it is installed)."""

import re
import tomllib

import pytest
import yaml

from hnclip.pipeline.config import REPO_ROOT

ENV_FILES = sorted((REPO_ROOT / "envs").glob("*.yaml"))


def _pins(requirements):
    pins = {}
    for line in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        if match:
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def test_there_is_one_env_per_stage():
    assert {p.stem for p in ENV_FILES} >= {"data", "train", "evaluate", "llava", "report"}


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_agree_with_pyproject(env_file):
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    expected = _pins(project["dependencies"])
    env = yaml.safe_load(env_file.read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = _pins(pip_section)
    assert pinned, env_file
    for name, version in pinned.items():
        assert expected.get(name) == version, f"{env_file.name}: {name}=={version}, pyproject has {expected.get(name)}"
