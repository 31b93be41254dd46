"""Build kubetune's images and push them to a registry, with or without a Docker engine.

    python3 tests/support/images.py build [--registry ghcr.io/kubetune] [--tag 0.1.0]
    python3 tests/support/images.py push TARGET [--registry ...] [--tag ...] [--insecure]
    python3 tests/support/images.py registry --port P --root DIR   (loopback, foreground)

`make images` runs `build`, `make push-images` runs `push`; docs/e2e.md ("Images") explains.

Where `docker info` answers, `docker build` builds all four images (operator, CUDA 12.6 and
13.0 trainers, CPU trainer) from the Dockerfiles' defaults. Elsewhere buildah builds them with
chroot isolation (no daemon, root) from the same Dockerfiles on a base that mmdebstrap makes
from Debian's packages (built once, then reused from local storage). The GPU trainer's base is
PyTorch's CUDA image from Docker Hub: without an engine (and its registry) it is not built, and
the build says so after checking what it can (its base tag against the torch pin).

A buildah build sees the host's pip configuration and every local file it names (CA bundle,
wheel folders, file:// indexes) as read-only volumes, and the pinned CPU torch wheel
(requirements/cpu_torch.py --download) as TORCH_SOURCE: mounts, never copied into a layer.
After each build the image is checked for leftovers of them (`leaks`).

Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "images"
# The base image from Debian's packages: Python 3.11 (constraints.txt is resolved on 3.11).
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# Where a buildah build sees the host's pip configuration and the files it names.
HOST_MOUNTS = "/run/kubetune-host"
TORCH_MOUNT = "/run/kubetune-torch"
# Paths a layer must not hold after a build (pip configuration, the mounts' targets).
LEAK_PATHS = ("etc/pip.conf", "etc/xdg/pip", "root/.config/pip", "root/.pip",
              HOST_MOUNTS.lstrip("/"), TORCH_MOUNT.lstrip("/"))


@dataclass(frozen=True)
class Image:
    key: str           # what the tests and the summary call it
    dockerfile: str
    repository: str    # under the registry: operator or trainer
    suffix: str        # tag suffix after the version
    build_args: tuple[tuple[str, str], ...] = ()
    gpu: bool = False  # its base is PyTorch's CUDA image (Docker Hub)

    def name(self, registry: str, tag: str) -> str:
        return f"{registry}/{self.repository}:{tag}{self.suffix}"


IMAGES = (
    Image("operator", "operator/Dockerfile", "operator", ""),
    Image("trainer-cpu", "trainer_image/Dockerfile.cpu", "trainer", "-cpu"),
    Image("trainer", "trainer_image/Dockerfile", "trainer", "", gpu=True),
    Image("trainer-cuda13.0", "trainer_image/Dockerfile", "trainer", "-cuda13.0",
          (("CUDA_VERSION", "13.0"),), gpu=True),
)


def project_version() -> str:
    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    if found is None:
        raise SystemExit("pyproject.toml: no version")
    return found.group(1)


def run(cmd: list[str], log: Path | None = None, **kw: object) -> str:
    """Run cmd; on failure show its command and the end of its output, then stop."""
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=ROOT, **kw)  # type: ignore[call-overload]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out.stdout)
    if out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-40:])
        where = f" (full log: {log})" if log else ""
        raise SystemExit(f"images: `{shlex.join(cmd)}` failed ({out.returncode}){where}:\n{tail}")
    return str(out.stdout)


def docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# --- the base: Debian's Python, built once --------------------------------------------------

def base_name() -> str:
    """Named after what makes it, so a change to the package list builds a new one."""
    recipe = hashlib.sha256(" ".join((BASE_SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:10]
    return f"localhost/kubetune-base:py3.11-{BASE_SUITE}-{recipe}"


def ensure_base() -> tuple[str, float | None]:
    """The base image's name and its build seconds (None: already in local storage)."""
    name = base_name()
    if subprocess.run(["podman", "image", "exists", name]).returncode == 0:
        return name, None
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    tar = WORK / "base.tar"
    run(["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
         BASE_SUITE, str(tar)], log=WORK / "logs" / "base.log")
    run(["podman", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]',
         str(tar), name])
    tar.unlink()
    return name, time.monotonic() - started


# --- the host's pip configuration, as build volumes -----------------------------------------

def host_pip_config() -> dict[str, str]:
    """pip's effective settings here (files and PIP_* variables), `pip config list`'s keys."""
    listed = run([sys.executable, "-m", "pip", "config", "list"])
    settings = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if section in ("global", ":env:", "install", "download") and value:
            settings[option] = value.strip().strip("'\"")
    return settings


def pip_build_volumes(settings: dict[str, str]) -> tuple[str, list[str]]:
    """A pip.conf for the build, and the volumes that show it and the local files it names.

    Every local path in a value (a file, a folder, a file:// URL) is mounted read-only under
    HOST_MOUNTS and the value rewritten to point there; remote URLs pass as they are. A local
    index's pages may link to files beside it (../files/...): its parent folder is mounted.
    """
    mounts: dict[str, str] = {}

    def moved(token: str, index: bool) -> str:
        path = token.removeprefix("file://")
        if not path.startswith("/") or not Path(path).exists():
            return token
        top = Path(path).parent if index else Path(path)
        while top.parent != Path("/") and not top.is_dir():
            top = top.parent
        mounts[str(top)] = f"{HOST_MOUNTS}{top}"
        return token.replace(path, f"{HOST_MOUNTS}{path}")

    lines = ["[global]"]
    for option, value in sorted(settings.items()):
        index = option.endswith("index-url")
        lines.append(f"{option} = {' '.join(moved(t, index) for t in value.split())}")
    conf = WORK / "pip.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o600)
    volumes = [f"{conf}:/etc/pip.conf:ro"]
    volumes += [f"{host}:{inside}:ro" for host, inside in sorted(mounts.items())]
    return str(conf), volumes


def torch_wheel() -> Path:
    """The pinned CPU torch wheel that `make venv` installs here, in a folder of its own."""
    folder = WORK / "torch-wheel"
    run([sys.executable, "requirements/cpu_torch.py", "--download", str(folder)])
    return folder


# --- builds -----------------------------------------------------------------------------------

def buildah_build(image: Image, name: str, base: str, volumes: list[str],
                  torch: Path | None) -> None:
    args = [f"PYTHON_IMAGE={base}", *(f"{k}={v}" for k, v in image.build_args)]
    vols = list(volumes)
    if torch is not None:
        args.append(f"TORCH_SOURCE={TORCH_MOUNT}")
        vols.append(f"{torch}:{TORCH_MOUNT}:ro")
    cmd = ["buildah", "bud", "--isolation", "chroot", "--layers", "-f", image.dockerfile,
           "-t", name]
    for arg in args:
        cmd += ["--build-arg", arg]
    for vol in vols:
        cmd += ["-v", vol]
    run([*cmd, "."], log=WORK / "logs" / f"{image.key}.log")


def holds_content(path: str) -> bool:
    """A file with bytes, a link, or a folder with such a thing anywhere below it."""
    if os.path.islink(path) or (os.path.isfile(path) and os.path.getsize(path) > 0):
        return True
    if not os.path.isdir(path):
        return False
    return any(holds_content(os.path.join(path, entry)) for entry in os.listdir(path))


def leaks(name: str) -> list[str]:
    """Paths of LEAK_PATHS with content in the image (empty: nothing leaked).

    buildah (1.28) leaves the empty mount points of its build volumes behind (an empty
    /etc/pip.conf, empty folders under HOST_MOUNTS): harmless, and allowed; any byte is not.
    """
    root = run(["podman", "image", "mount", name]).strip()
    try:
        return [path for path in LEAK_PATHS if holds_content(os.path.join(root, path))]
    finally:
        subprocess.run(["podman", "image", "unmount", name], capture_output=True)


def gpu_base_check(image: Image) -> str:
    """What can be checked of a GPU image without its base: the base tag's torch = the pin
    (every stage's tag is made from the same TORCH_VERSION). Returns the final stage's base."""
    text = (ROOT / image.dockerfile).read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M)) | dict(image.build_args)
    stages = re.findall(r"^FROM (\S+)", text, re.M)  # a build stage first, the image's last
    assert stages, image.dockerfile
    tag = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], stages[-1])
    pinned = re.search(r"^torch==(\S+)", (ROOT / "requirements/constraints.txt").read_text(),
                       re.M)
    if pinned is None or defaults["TORCH_VERSION"] != pinned.group(1):
        raise SystemExit(f"{image.dockerfile}: TORCH_VERSION {defaults['TORCH_VERSION']} is "
                         f"not constraints.txt's torch pin")
    return tag


def inspect(tool: str, name: str) -> dict[str, object]:
    found = json.loads(run([tool, "image", "inspect", name]))[0]
    return {"id": found["Id"], "digest": found.get("Digest") or "-", "size": found["Size"]}


def build(registry: str, tag: str, only: set[str] | None) -> list[dict[str, object]]:
    chosen = [image for image in IMAGES if only is None or image.key in only]
    rows: list[dict[str, object]] = []
    if docker_answers():
        for image in chosen:
            name, started = image.name(registry, tag), time.monotonic()
            run(["docker", "build", "-f", image.dockerfile, "-t", name,
                 *(f"--build-arg={k}={v}" for k, v in image.build_args), "."],
                log=WORK / "logs" / f"{image.key}.log")
            rows.append({"image": name, "seconds": time.monotonic() - started,
                         **inspect("docker", name)})
        return rows
    base, base_seconds = ensure_base()
    rows.append({"image": base, "seconds": base_seconds, **inspect("podman", base)})
    _, volumes = pip_build_volumes(host_pip_config())
    torch = torch_wheel() if any(i.key == "trainer-cpu" for i in chosen) else None
    for image in chosen:
        name = image.name(registry, tag)
        if image.gpu:
            rows.append({"image": name, "seconds": None, "id": "-", "digest": "-", "size": None,
                         "note": f"not built: no Docker engine, base {gpu_base_check(image)} "
                                 "is a Docker Hub image (its torch tag matches the pin)"})
            continue
        started = time.monotonic()
        buildah_build(image, name, base, volumes, torch if image.key == "trainer-cpu" else None)
        seconds = time.monotonic() - started
        leaked = leaks(name)
        if leaked:
            raise SystemExit(f"images: {name} holds build-only paths {leaked}")
        rows.append({"image": name, "seconds": seconds, **inspect("podman", name)})
    return rows


def summary(rows: list[dict[str, object]]) -> str:
    lines = []
    for row in rows:
        seconds = row.get("seconds")
        took = ("not built" if row.get("note") else "reused") if seconds is None \
            else f"{seconds:.0f} s"
        size = row.get("size")
        shown = "-" if size is None else f"{int(str(size)) / 1e6:.0f} MB"
        lines.append(f"{row['image']}  digest {row['digest']}  size {shown}  build {took}"
                     + (f"  ({row['note']})" if row.get("note") else ""))
    return "\n".join(lines)


# --- registry -----------------------------------------------------------------------------------

def push(target: str, registry: str, tag: str, tls_verify: bool) -> dict[str, str]:
    """Push the locally built images to target; returns {key: target/repo@digest}."""
    pushed = {}
    for image in IMAGES:
        local = image.name(registry, tag)
        if image.gpu or subprocess.run(["podman", "image", "exists", local]).returncode != 0:
            continue
        remote = image.name(target, tag)
        digest_file = WORK / f"{image.key}.digest"
        WORK.mkdir(parents=True, exist_ok=True)
        # zstd: the trainer's 2.4 GB of layers compress several times faster than with gzip.
        run(["podman", "push", f"--tls-verify={str(tls_verify).lower()}",
             "--compression-format", "zstd", "--digestfile",
             str(digest_file), local, remote])
        pushed[image.key] = f"{target}/{image.repository}@{digest_file.read_text().strip()}"
    return pushed


def pull_by_digest(reference: str, tls_verify: bool) -> str:
    """Pull an image by its registry digest; returns the pulled image's ID."""
    run(["podman", "pull", "-q", f"--tls-verify={str(tls_verify).lower()}", reference])
    return str(inspect("podman", reference)["id"])


def registry_config(port: int, root: Path) -> str:
    return (f"version: 0.1\nlog: {{level: warn}}\n"
            f"storage: {{filesystem: {{rootdirectory: {root}}}}}\n"
            f"http: {{addr: 127.0.0.1:{port}}}\n")


def registry_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default="ghcr.io/kubetune",
                        help="registry/namespace of the local image names")
    parser.add_argument("--tag", default=None, help="image tag (default: pyproject version)")
    sub = parser.add_subparsers(dest="command", required=True)
    built = sub.add_parser("build")
    built.add_argument("--only", help="comma-separated keys: " + ",".join(i.key for i in IMAGES))
    pushed = sub.add_parser("push")
    pushed.add_argument("target", help="registry/namespace to push to, e.g. 127.0.0.1:5000/kt")
    pushed.add_argument("--insecure", action="store_true",
                        help="plain HTTP / unverified TLS (a registry on loopback)")
    served = sub.add_parser("registry")
    served.add_argument("--port", type=int, required=True)
    served.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    tag = args.tag or project_version()
    if args.command == "build":
        only = set(args.only.split(",")) if args.only else None
        unknown = (only or set()) - {i.key for i in IMAGES}
        if unknown:
            parser.error(f"--only: unknown images {sorted(unknown)}")
        print(summary(build(args.registry, tag, only)))
    elif args.command == "push":
        for key, reference in push(args.target, args.registry, tag, not args.insecure).items():
            print(f"{key}: {reference}")
    else:
        config = WORK / f"registry-{args.port}.yml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(registry_config(args.port, args.root))
        os.execvp("docker-registry", ["docker-registry", "serve", str(config)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
