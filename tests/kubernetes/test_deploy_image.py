"""The image the manifests in ``manifests/deploy`` run is the one the ``Dockerfile`` builds.

No container runtime runs here, so the Dockerfile is read, not built: its entrypoint and
every container's ``command`` must be console scripts the package installs, its user the
one the pods run as, its sources the ones the package is made of; and with a read-only
root filesystem every place the processes write (their data dir as their parsers read it,
the temporary folder, the image's HOME) must be a writable volume.
"""

from __future__ import annotations

import json
import pathlib
import re
import tempfile
import tomllib
from typing import Any

import yaml

from edge_agent import main as agent_main
from orchestrator.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/edgeplane/edgeplane:"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, rest of the line)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def final(word: str) -> list[str]:
    return [rest for w, rest in instructions()[-1] if w == word]


def pods() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) for every container running the edgeplane image;
    a StatefulSet's claims are among its pod's volumes."""
    found = []
    for path in sorted((ROOT / "manifests" / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
                spec = dict(doc["spec"]["template"]["spec"])
                spec["volumes"] = spec.get("volumes", []) + [
                    {"name": t["metadata"]["name"], "persistentVolumeClaim": {}} for t in doc["spec"].get("volumeClaimTemplates", [])]
                found += [(doc["metadata"]["name"], spec, c) for c in spec["containers"] if c["image"].startswith(IMAGE)]
    assert {name for name, _, _ in found} >= {"edgeplane-control-plane", "edgeplane-gateway", "edgeplane-agent-edge-lyon"}
    return found


def test_every_container_runs_a_console_script_of_the_package() -> None:
    (entrypoint,) = final("ENTRYPOINT")
    program = json.loads(entrypoint)  # the exec form: the container's args follow it, and it gets SIGTERM itself
    scripts = PYPROJECT["project"]["scripts"]
    assert program == ["edgeplane"]
    for name, _, c in pods():
        assert (c.get("command") or program)[0] in scripts, f"{name}: {c.get('command')} is not installed by the package"
    agent = next(c for name, _, c in pods() if name.startswith("edgeplane-agent"))
    assert agent["command"] == ["edgeplane-agent"]


def test_the_pods_run_as_the_image_user_without_privileges() -> None:
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    for name, spec, c in pods():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == int(uid), name
        assert pod["fsGroup"] == int(gid or uid), f"{name}: its volumes would not be writable by the image user"
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], name
        assert ctx["readOnlyRootFilesystem"] is True, name


def written(c: dict[str, Any]) -> set[pathlib.Path]:
    """Where the container's process writes, as its own parser reads its arguments."""
    env = {"POD_NAME": "pod-0", "NODE_IP": "10.0.0.1", "NODE_NAME": "node-1"} | {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["args"]]
    if c.get("command") == ["edgeplane-agent"]:
        return {pathlib.Path(agent_main.parser().parse_args(args).data_dir)}
    parsed = cli_main.build_parser().parse_args(args)
    return {pathlib.Path(parsed.data_dir)} if parsed.command == "serve" else set()


def test_what_the_processes_write_is_on_a_writable_volume() -> None:
    env = dict(rest.split("=", 1) for line in final("ENV") for rest in line.split())
    for name, spec, c in pods():
        if not c["securityContext"].get("readOnlyRootFilesystem"):
            continue
        mounts = {pathlib.Path(m["mountPath"]): m for m in c.get("volumeMounts", [])}
        assert {m["name"] for m in mounts.values()} <= {v["name"] for v in spec["volumes"]}, name
        for path in written(c) | {pathlib.Path(tempfile.gettempdir()), pathlib.Path(env["HOME"])}:
            holder = max((m for m in mounts if path == m or m in path.parents), key=lambda m: len(m.parts), default=None)
            assert holder is not None and not mounts[holder].get("readOnly"), f"{name} writes {path}: no writable volume there"


def test_the_image_builds_the_package_from_its_sources_without_dev_extras() -> None:
    build = instructions()[0]
    copied = {part for w, rest in build if w == "COPY" and not rest.startswith("--from")
              for part in rest.split()[:-1]}
    assert {"pyproject.toml", "setup.py", "protos"} <= copied  # setup.py generates the gRPC modules from protos/
    assert PYPROJECT["project"]["readme"] in copied
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"the package {pattern} is not copied into the build"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for source in copied:
        assert (ROOT / source).exists(), source
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f".dockerignore leaves {source} out of the build context"
    (install,) = [rest for rest in final("RUN") if "pip install" in rest]
    extras = install.split("[", 1)[1].split("]", 1)[0].split(",")
    assert "dev" not in extras and set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])


def test_a_host_folder_the_agent_writes_is_given_to_its_user_first() -> None:
    """fsGroup does not apply to a hostPath, which the kubelet creates owned by root: an init
    container gives it to the pods' user, as root with no other capability than CHOWN."""
    for path in sorted((ROOT / "manifests" / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
                continue
            spec = doc["spec"]["template"]["spec"]
            host = {v["name"] for v in spec.get("volumes", []) if "hostPath" in v}
            owned = set()
            for init in spec.get("initContainers", []):
                ctx = init["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True, init["name"]
                assert ctx["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}, init["name"]
                program, owner, *folders = init["command"]
                assert program == "chown" and owner == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
                owned |= {m["name"] for m in init["volumeMounts"] if m["mountPath"] in folders}
            for c in spec["containers"]:
                written_there = {m["name"] for m in c.get("volumeMounts", []) if m["name"] in host and not m.get("readOnly")}
                assert written_there <= owned, f"{doc['metadata']['name']}: {sorted(written_there - owned)} stay root's"
