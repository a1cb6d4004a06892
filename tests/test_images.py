"""Both Dockerfiles' build steps, carried out as far as a machine without a Docker engine allows.

A real Dockerfile parser (dockerfile-parse) reads each Dockerfile; then
- every instruction is one Docker knows;
- the build context is what .dockerignore leaves of the repository (docker-py's implementation of its rules), and
  every COPY source is in it;
- every `pip install` of a RUN resolves verbatim (its own arguments, its files taken from where the COPY steps put
  them) with pip's resolver for the image's Python and platform, to exactly the image's constraints file;
- the image's file layout is built from its COPY/WORKDIR/ENV steps in a temporary directory, the image's venv
  standing for a test venv, and the image's ENTRYPOINT + CMD run there with the image's environment;
- compose's entrypoints, commands and health check run in that layout.
"""

from __future__ import annotations

import http.server
import importlib.metadata
import io
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import extract_key_values
from packaging.utils import canonicalize_name

from conftest import REPO, free_port

BIN = Path(sys.executable).parent
IMAGES = ("trainer", "vllm")
# The test venv that stands for each image's venv: the same libraries, on this machine's CPU torch.
TEST_VENVS = {"trainer": REPO / ".venv/trainer", "vllm": REPO / ".venv/server"}
KNOWN_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                      "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# What nvidia/cuda:12.2.2-base-ubuntu22.04 sets before the Dockerfile's own ENV.
BASE_IMAGE_ENV = {"PATH": "/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
                          ":/sbin:/bin",
                  "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"}
# The base image's own tools (sh, head for docker/cuda-env.sh): this machine's stand in for them.
BASE_SYSTEM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Ubuntu 22.04 (glibc 2.35) on x86-64: pip matches platform tags exactly, so each manylinux level is named.
PLATFORM_TAGS = [f"manylinux_2_{n}_x86_64" for n in range(17, 36)] + ["manylinux2014_x86_64", "linux_x86_64"]
# pip's transport settings of this machine; every other PIP_* variable (its local indexes, find-links) stays out,
# as does its config file (a torch cap): the image's pip has neither.
PIP_TRANSPORT = ("PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_DISABLE_PIP_VERSION_CHECK")
# The CPU tests pin a CPU build of torch; the images pin the CUDA build vLLM 0.26.0 needs.
CPU_TEST_ONLY_PINS = {"torch"}
CPU_TEST_REQUIREMENTS = {"trainer": "requirements-trainer-cpu.txt", "vllm": "requirements-server-cpu.txt"}


# ------------------------------------------------------------------ reading a Dockerfile
@dataclass
class Step:
    instruction: str
    value: str
    line: int
    env: dict[str, str]
    workdir: str


@dataclass
class Build:
    image: str
    steps: list[Step] = field(default_factory=list)  # of the final stage, the one that makes the image
    stages: dict[str, str] = field(default_factory=dict)  # alias -> image reference
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    files: dict[str, tuple[str, int | None, int]] = field(default_factory=dict)  # image path -> (context path, mode, step)
    missing_sources: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    def runs(self) -> list[Step]:
        return [s for s in self.steps if s.instruction == "RUN"]


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def build_context(root: Path) -> set[str]:
    """The files `docker build` sends for a context at root: all but those .dockerignore leaves out."""
    patterns = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return {p for p in exclude_paths(str(root), patterns) if (root / p).is_file()}


def exec_form(value: str) -> list[str]:
    return json.loads(value) if value.lstrip().startswith("[") else ["/bin/sh", "-c", value]


def read_build(image: str, text: str | None = None) -> Build:
    text = (REPO / "docker" / image / "Dockerfile").read_text() if text is None else text
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    context = build_context(REPO)
    build, global_args = Build(image), {}
    for item in parser.structure:
        kind, value, line = item["instruction"], item["value"], item["startline"] + 1
        if kind == "COMMENT":
            continue
        if kind == "FROM":
            parts = re.split(r"\s+as\s+", value, flags=re.I)
            reference, alias = parts[0], parts[1] if len(parts) > 1 else ""
            build.stages[alias] = expand(reference, global_args)
            # a new stage starts from its base image: only the last one's steps make the image
            build.steps, build.files, build.args = [], {}, {}
            build.env, build.workdir = dict(BASE_IMAGE_ENV), "/"
            continue
        if kind == "ARG":
            name, _, default = value.partition("=")
            (build.args if build.stages else global_args)[name.strip()] = default.strip()
        elif kind == "ENV":
            build.env.update(extract_key_values(env_replace=True, args=build.args, envs=build.env,
                                                instruction_value=value))
        elif kind == "WORKDIR":
            build.workdir = posixpath.join(build.workdir, expand(value, build.env))
        elif kind in ("COPY", "ADD"):
            copy_into(build, value, line, context, len(build.steps))
        elif kind == "ENTRYPOINT":
            build.entrypoint, build.cmd = exec_form(value), []
        elif kind == "CMD":
            build.cmd = exec_form(value)
        build.steps.append(Step(kind, value, line, dict(build.env), build.workdir))
    return build


def copy_into(build: Build, value: str, line: int, context: set[str], step: int) -> None:
    words = json.loads(value) if value.lstrip().startswith("[") else shlex.split(value)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    *sources, dest = [w for w in words if not w.startswith("--")]
    if "from" in flags:
        return  # from another stage or image, not from the build context
    mode = int(flags["chmod"], 8) if "chmod" in flags else None
    into_dir = dest.endswith("/") or len(sources) > 1
    dest = posixpath.normpath(posixpath.join(build.workdir, expand(dest, build.env)))
    for source in sources:
        source = posixpath.normpath(source)
        inside = sorted(f for f in context if f.startswith(source + "/"))
        if source in context:
            target = posixpath.join(dest, posixpath.basename(source)) if into_dir else dest
            build.files[target] = (source, mode, step)
        elif inside:
            for f in inside:
                build.files[posixpath.join(dest, f[len(source) + 1:])] = (f, mode, step)
        else:
            build.missing_sources.append(f"line {line}: {source}")


def shell_commands(script: str) -> list[list[str]]:
    """A RUN's shell script as the simple commands it runs (split at &&, ||, ;, |)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def pip_installs(build: Build) -> list[tuple[Step, list[str]]]:
    """Each `pip install` run by a RUN step, with its arguments after `install`."""
    found = []
    for step in build.runs():
        for command in shell_commands(step.value):
            words = command[2:] if command[:2] == ["python", "-m"] else command
            if words and posixpath.basename(words[0]) in ("pip", "pip3") and words[1:2] == ["install"]:
                found.append((step, words[2:]))
    return found


def apt_packages(build: Build) -> set[str]:
    return {word for step in build.runs() for command in shell_commands(step.value)
            if command[:2] == ["apt-get", "install"] for word in command[2:] if not word.startswith("-")}


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and not name.startswith("-"):
            found[canonicalize_name(name)] = version.strip()
    return found


def requirement_pins(path: Path) -> dict[str, str]:
    """The `==` pins of a requirements file and of those it includes with -r."""
    lines = path.read_text().splitlines()
    found = pins(lines)
    for line in lines:
        if line.startswith("-r"):
            found.update(requirement_pins((path.parent / line[2:].strip()).resolve()))
    return found


def constraints(image: str) -> dict[str, str]:
    return pins((REPO / "docker" / image / "constraints.txt").read_text().splitlines())


# ------------------------------------------------------------------ the image's layout in a temporary directory
def venv_dir(build: Build) -> str:
    made = [m.group(1) for step in build.runs() for m in re.finditer(r"-m venv (\S+)", step.value)]
    assert made, f"{build.image}: no RUN makes a venv"
    return made[-1]


def make_venv_standin(target: Path, venv: Path) -> None:
    """A venv at target with the test venv's interpreter and libraries, but not the editable install of this
    repository: the image has the trainer package only where its COPY puts it."""
    (target / "bin").mkdir(parents=True)
    shutil.copy(venv / "pyvenv.cfg", target / "pyvenv.cfg")
    interpreter = os.path.realpath(venv / "bin/python")
    for entry in (venv / "bin").iterdir():
        if entry.name.startswith("python"):
            (target / "bin" / entry.name).symlink_to(interpreter)
        elif entry.is_file() and os.access(entry, os.X_OK):
            (target / "bin" / entry.name).symlink_to(entry)
    (site,) = venv.glob("lib/python3*/site-packages")
    target_site = target / site.relative_to(venv)
    target_site.mkdir(parents=True)
    for entry in site.iterdir():
        installed_from_repo = ((entry / "direct_url.json").is_file()
                               and str(REPO) in (entry / "direct_url.json").read_text())
        if entry.name.startswith("__editable__") or installed_from_repo:
            continue
        (target_site / entry.name).symlink_to(entry)


def reroot(path: str, root: Path) -> str:
    return str(root) + path if path.startswith("/") else path


def layout_env(build: Build, root: Path) -> dict[str, str]:
    env = {}
    for name, value in build.env.items():
        parts = value.split(":")
        if all(p.startswith("/") for p in parts):
            rerooted = []
            for p in parts:
                rerooted.append(reroot(p, root))
                if name == "PATH" and p in BASE_SYSTEM_DIRS:
                    rerooted.append(p)
            value = ":".join(rerooted)
        env[name] = value
    return {**env, "HOME": str(root / "home/app")}


def make_layout(build: Build, root: Path) -> Path:
    for image_path, (source, mode, _) in build.files.items():
        target = root / image_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / source, target)
        if mode is not None:
            target.chmod(mode)
    make_venv_standin(root / venv_dir(build).lstrip("/"), TEST_VENVS[build.image])
    (root / build.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)  # Docker creates a WORKDIR
    (root / "home/app").mkdir(parents=True, exist_ok=True)
    return root


def run_in_layout(build: Build, root: Path, argv: list[str], env: dict[str, str] | None = None,
                  timeout: int = 120) -> subprocess.CompletedProcess:
    argv = [reroot(a, root) for a in argv]
    return subprocess.run(argv, cwd=root / build.workdir.lstrip("/"), env={**layout_env(build, root), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def needs_test_venv(image: str) -> None:
    if not (TEST_VENVS[image] / "bin/python").exists():
        pytest.skip(f"{TEST_VENVS[image]} is not built (scripts/setup_test_env.sh)")


def python_of(minor: str) -> Path | None:
    """An interpreter of that minor release on this machine (on PATH, or one pyenv installed)."""
    candidates = [shutil.which(f"python{minor}")]
    pyenv = subprocess.run(["pyenv", "root"], capture_output=True, text=True) if shutil.which("pyenv") else None
    if pyenv and pyenv.returncode == 0:
        candidates += sorted(Path(pyenv.stdout.strip()).glob(f"versions/{minor}.*/bin/python{minor}"))
    for candidate in filter(None, candidates):
        if subprocess.run([str(candidate), "--version"], capture_output=True).returncode == 0:
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def resolver_for(tmp_path_factory):
    """pip, the test venv's release, on an interpreter of the image's Python minor release: pip evaluates
    environment markers (e.g. `six; python_version > "3.11"`, a dependency of vLLM) with the Python it runs on,
    whatever --python-version says."""
    made = {}

    def resolver(python_version: str) -> Path:
        minor = ".".join(python_version.split(".")[:2])
        if minor not in made:
            interpreter = python_of(minor)
            assert interpreter, f"the images' installs resolve on a Python {minor}, and this machine has none"
            venv = tmp_path_factory.mktemp(f"resolver-{minor}")
            subprocess.run([str(interpreter), "-m", "venv", "--without-pip", str(venv)], check=True)
            (site,) = venv.glob("lib/python3*/site-packages")
            pip = Path(importlib.metadata.distribution("pip").locate_file("pip"))
            (site / "pip").symlink_to(pip)
            made[minor] = venv / "bin/python"
        return made[minor]

    return resolver


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("image", IMAGES)
def test_every_instruction_is_one_docker_knows(image):
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / "docker" / image / "Dockerfile").read_bytes()))
    unknown = [(i["startline"] + 1, i["instruction"]) for i in parser.structure
               if i["instruction"] != "COMMENT" and i["instruction"] not in KNOWN_INSTRUCTIONS]
    assert not unknown, f"docker/{image}/Dockerfile: unknown instructions (line, name): {unknown}"


def test_build_context_leaves_out_local_state(tmp_path):
    # a checkout after the tests ran and a run was bundled: none of this may reach the Docker daemon
    local_state = [".venv/trainer/bin/python", "runs/demo/checkpoint-1/adapter.safetensors", ".git/HEAD", ".env",
                   ".whl/trl-1.16.0-py3-none-any.whl", ".vllm-bundle/part1", "build/lib/x.py",
                   "trainer/__pycache__/config.cpython-312.pyc"]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked + local_state:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    shutil.copy(REPO / ".dockerignore", tmp_path / ".dockerignore")
    context = build_context(tmp_path)
    assert not context & set(local_state), sorted(context & set(local_state))
    # the real tree: small enough to send on every build
    size = sum((REPO / f).stat().st_size for f in build_context(REPO))
    assert size < 5_000_000, f"the build context is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("image", IMAGES)
def test_every_copy_source_is_in_the_build_context(image):
    build = read_build(image)
    assert not build.missing_sources, (f"docker/{image}/Dockerfile copies what the build context lacks (missing, or "
                                       f"left out by .dockerignore): {build.missing_sources}")
    assert build.files


@pytest.mark.parametrize("image", IMAGES)
def test_pip_installs_resolve_verbatim_to_the_constraints(image, tmp_path, resolver_for):
    build = read_build(image)
    python = build.args.get("PYTHON_VERSION")
    assert python, f"docker/{image}/Dockerfile names no exact Python (ARG PYTHON_VERSION)"
    installs = pip_installs(build)
    assert installs, f"docker/{image}/Dockerfile installs nothing with pip"
    # the resolver that runs here is the pip release the image installs before anything else
    assert installs[0][1][-1] == f"pip=={importlib.metadata.version('pip')}", installs[0]
    root = tmp_path / "image"
    for image_path, (source, _, _) in build.files.items():
        (root / image_path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, root / image_path.lstrip("/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in PIP_TRANSPORT}
    for n, (step, args) in enumerate(installs):
        mapped, expected, file_flag = [], pins(args), None
        for arg in args:
            if file_flag:
                path = posixpath.join(step.workdir, arg)
                copied = build.files.get(path)
                assert copied and copied[2] < build.steps.index(step), (
                    f"docker/{image}/Dockerfile line {step.line}: pip install reads {path!r}, which no earlier COPY "
                    f"brought into the image")
                arg = reroot(path, root)
                if file_flag in ("-c", "--constraint"):
                    expected = pins(Path(arg).read_text().splitlines())
            file_flag = arg if arg in ("-r", "--requirement", "-c", "--constraint") else None
            mapped.append(arg)
        report = tmp_path / f"report-{n}.json"
        result = subprocess.run(
            [str(resolver_for(python)), "-m", "pip", "install", *mapped, "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), "--python-version", python, "--implementation", "cp",
             "--abi", "cp" + "".join(python.split(".")[:2]), *[a for t in PLATFORM_TAGS for a in ("--platform", t)]],
            capture_output=True, text=True, timeout=300,
            env={**env, **{k: v for k, v in step.env.items() if k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull})
        assert result.returncode == 0, f"line {step.line}: pip install {shlex.join(args)}\n{result.stderr[-3000:]}"
        resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                    for i in json.loads(report.read_text())["install"]}
        # with a constraints file: exactly its packages and versions; without: what the command pins
        differ = {k: (resolved.get(k), expected.get(k)) for k in resolved.keys() | expected.keys()
                  if resolved.get(k) != expected.get(k)}
        assert not differ, (f"docker/{image}/Dockerfile line {step.line}: (resolved, locked) versions differ; "
                            f"run bash docker/lock.sh: {differ}")


@pytest.mark.parametrize("image", IMAGES)
def test_constraints_agree_with_the_pins(image):
    build = read_build(image)
    locked = constraints(image)
    wanted = {}
    for step, args in pip_installs(build):
        if "-c" not in args and "--constraint" not in args:
            continue  # pip's own upgrade, pinned on its command line
        wanted.update(pins(args))
        for flag, path in zip(args, args[1:]):
            if flag in ("-r", "--requirement"):
                copied = build.files.get(posixpath.join(step.workdir, path))
                assert copied, f"docker/{image}/Dockerfile line {step.line}: no COPY brought {path!r}"
                wanted.update(requirement_pins(REPO / copied[0]))
    assert wanted, f"docker/{image}/Dockerfile pins nothing"
    differ = {name: (version, locked.get(name)) for name, version in wanted.items() if locked.get(name) != version}
    assert not differ, f"pin vs docker/{image}/constraints.txt (run bash docker/lock.sh): {differ}"
    # the CPU test environment of this image's service uses its versions wherever it names the same package (the two
    # images may differ: vLLM pins its own CUTLASS DSL, the trainer's FlashAttention 4 another)
    requirements = REPO / "tests" / CPU_TEST_REQUIREMENTS[image]
    differ = {name: (version, locked[name]) for name, version in requirement_pins(requirements).items()
              if name in locked and locked[name] != version and name not in CPU_TEST_ONLY_PINS}
    assert not differ, f"{requirements.name} vs docker/{image}/constraints.txt: {differ}"


@pytest.mark.parametrize("image, compilers", [("trainer", {"gcc"}), ("vllm", {"gcc", "g++"})])
def test_images_have_a_compiler_and_python_headers(image, compilers):
    build = read_build(image)
    packages = apt_packages(build)
    # Triton builds its launcher with a C compiler, libc's headers and Python.h at run time; FlashInfer's JIT
    # gives nvcc a host C++ compiler.
    assert compilers | {"libc6-dev"} <= packages, packages
    assert not {p for p in packages if p.startswith("python3")}, "the image's Python comes from uv, not apt"
    # The Python: uv-managed CPython at an exact version, the venv made from it.
    python = build.args.get("PYTHON_VERSION", "")
    assert re.fullmatch(r"3\.12\.\d+", python), f"ARG PYTHON_VERSION={python!r}: an exact 3.12 release"
    scripts = " ; ".join(s.value for s in build.runs())
    assert 'uv python install --no-bin "${PYTHON_VERSION}"' in scripts
    assert f'"$(uv python find --managed-python "${{PYTHON_VERSION}}")" -m venv {venv_dir(build)}' in scripts
    assert build.env["PATH"].startswith(f"{venv_dir(build)}/bin:")
    # uv itself: the pinned release the tests install, copied from its image of the same tag
    uv_pin = requirement_pins(REPO / "tests/requirements-trainer-cpu.txt")["uv"]
    assert build.stages["uv"] == f"ghcr.io/astral-sh/uv:{uv_pin}" == f"ghcr.io/astral-sh/uv:{importlib.metadata.version('uv')}"
    # That uv knows this exact version and installs it from python-build-standalone's install_only archive, a
    # whole installation prefix with include/python3.12/Python.h. Only package registries are reachable here, so
    # the archive itself cannot be downloaded to look inside.
    listing = subprocess.run([str(BIN / "uv"), "python", "list", python, "--all-versions", "--only-downloads",
                              "--show-urls", "--no-config"], capture_output=True, text=True, check=True).stdout
    urls = [line.split()[1] for line in listing.splitlines() if line.startswith(f"cpython-{python}-linux-x86_64-gnu ")]
    assert urls, f"uv {uv_pin} offers no CPython {python} for x86-64 Linux"
    assert re.search(r"python-build-standalone/.*-x86_64-unknown-linux-gnu-install_only(_stripped)?\.tar\.gz$",
                     urls[0]), urls[0]


def test_trainer_entrypoint_runs_in_the_image_layout(tmp_path):
    needs_test_venv("trainer")
    build = read_build("trainer")
    root = make_layout(build, tmp_path)
    result = run_in_layout(build, root, build.entrypoint + build.cmd + ["--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MODEL_NAME" in result.stdout and "VLLM_SERVER_HOST" in result.stdout


def test_vllm_entrypoint_runs_in_the_image_layout(tmp_path):
    needs_test_venv("vllm")
    build = read_build("vllm")
    root = make_layout(build, tmp_path)
    result = run_in_layout(build, root, build.entrypoint + build.cmd + ["--print-command"])
    assert result.returncode == 0, result.stderr[-3000:]
    command = result.stdout.splitlines()
    # the server would run on the image's venv, the one the build installed vLLM into
    assert command[0] == reroot(f"{venv_dir(build)}/bin/python", root)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enable-lora" in command


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def compose_services(tmp_path: Path, env_text: str) -> dict:
    tmp_path.mkdir()
    for name in ("docker-compose.yml", "docker", "trainer"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".env").write_text(env_text)
    result = subprocess.run([str(BIN / "docker-compose"), "--profile", "*", "config", "--format", "json"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_compose_commands_and_health_check_run_in_the_image_layout(tmp_path):
    needs_test_venv("trainer")
    needs_test_venv("vllm")
    port = free_port()
    services = compose_services(tmp_path / "compose",
                                (REPO / ".env.example").read_text() + f"\nVLLM_SERVER_PORT={port}\n")
    builds = {name: read_build(name) for name in IMAGES}
    roots = {name: make_layout(build, tmp_path / name) for name, build in builds.items()}
    for name, service in services.items():
        image = re.fullmatch(r"docker/(\w+)/Dockerfile", service["build"]["dockerfile"]).group(1)
        build, root = builds[image], roots[image]
        argv = (service.get("entrypoint") or build.entrypoint) + (
            service.get("command") or ([] if service.get("entrypoint") else build.cmd))
        found = shutil.which(reroot(argv[0], root), path=layout_env(build, root)["PATH"])
        assert found and found.startswith(str(root)), f"service {name}: {argv[0]!r} is not in the {image} image"
    # the one-shot weights download: its command parses and gets as far as asking the Hub (offline here)
    fetch = services["fetch-weights"]
    env = {k: v for k, v in fetch["environment"].items() if v is not None}
    result = run_in_layout(builds["vllm"], roots["vllm"], fetch["entrypoint"] + fetch["command"],
                           env={**env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "offline mode is enabled" in result.stdout + result.stderr, result
    # the server's health check, in the server's image: passes while /health answers 200, fails without a server
    test = services["vllm"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert shutil.which(test[1], path=layout_env(builds["vllm"], roots["vllm"])["PATH"]), (
        f"the health check runs {test[1]!r}, which the vllm image does not have")
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        healthy = run_in_layout(builds["vllm"], roots["vllm"], test[1:], timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert healthy.returncode == 0, healthy.stderr
    assert run_in_layout(builds["vllm"], roots["vllm"], test[1:], timeout=30).returncode != 0
