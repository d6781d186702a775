"""The `ray up` configs pass Ray's own validation, and the Dockerfile passes a lint
(a subset of hadolint's rules, checked here since no Docker is reachable)."""

from __future__ import annotations

import copy
import pathlib
import re

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "cluster" / "ray").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_up_configs_pass_rays_validation(path):
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(path.read_text())
    # What `ray up` does before anything else: fill in the provider's defaults (no cloud call),
    # then check against Ray's JSON schema (ray-schema.json) and its own rules.
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["available_node_types"] and prepared["head_node_type"] in prepared["available_node_types"]
    # Our rules: token authentication on every node, the dashboard kept private, the image referenced.
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") >= 2 and "--dashboard-host=127.0.0.1" in starts
    assert "ziggurat topology resources" in starts
    assert "/etc/ziggurat/ray-token" in cfg["file_mounts"]
    assert cfg["docker"]["image"].startswith("ghcr.io/") and ":" in cfg["docker"]["image"]


def lint_dockerfile(text: str) -> list[str]:
    """hadolint rules DL3006/DL3007 (pinned base tag, not latest), DL3008-style pins on apt
    packages, DL3009 (apt lists removed), DL3015 (--no-install-recommends), DL4006
    (pipefail before pipes), DL3025 (CMD as JSON), DL3002 (not running as root), DL3020
    (COPY, not ADD, for files)."""
    problems = []
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    if not froms or any(":" not in f.split()[1] or f.split()[1].endswith(":latest") for f in froms):
        problems.append("DL3006/DL3007: base image without a pinned tag")
    runs = [ln for ln in lines if ln.upper().startswith("RUN ")]
    for r in runs:
        if "apt-get install" in r:
            if "--no-install-recommends" not in r:
                problems.append("DL3015: apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in r:
                problems.append("DL3009: apt lists not removed")
            pkgs = r.split("apt-get install", 1)[1].split("&&")[0].split()
            if any(not p.startswith("-") and "=" not in p for p in pkgs):
                problems.append("DL3008: apt package without a version pin")
        if "|" in r.replace("||", "") and not any('"pipefail"' in ln or "pipefail" in ln for ln in lines
                                                 if ln.upper().startswith("SHELL")):
            problems.append("DL4006: a pipe without SHELL pipefail")
    if any(ln.upper().startswith("ADD ") for ln in lines):
        problems.append("DL3020: ADD for files")
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    if not users or users[-1] in ("root", "0"):
        problems.append("DL3002: the last USER is root")
    cmds = [ln for ln in lines if ln.upper().startswith(("CMD ", "ENTRYPOINT "))]
    if not cmds or any(not ln.split(None, 1)[1].startswith("[") for ln in cmds):
        problems.append("DL3025: CMD/ENTRYPOINT not in JSON form")
    return problems


def test_dockerfile_passes_the_lint():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert lint_dockerfile(text) == []
    assert "nvidia/cuda:" in text and "torch==" in text


def test_the_lint_catches_what_it_checks():
    bad = "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nADD x /x\nCMD ziggurat serve\n"
    found = " ".join(lint_dockerfile(bad))
    for rule in ("DL3006", "DL3015", "DL3009", "DL3008", "DL3020", "DL3002", "DL3025"):
        assert rule in found
