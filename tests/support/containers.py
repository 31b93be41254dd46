"""Pods as containers: the e2e harness's kubelet with podman (runc) instead of processes.

`pod_options` is the one place that turns a pod spec into `podman run` options. It honours
what a kubelet would do on one node and raises `Unsupported` for any field it cannot honour,
naming the field: nothing is dropped silently (docs/e2e.md, "Pods as containers", has the
table). `ContainerPodRunner` is the PodRunner whose kubelet starts those containers;
`OperatorContainer` runs the operator image as the chart's Deployment does.

Every container shares the host's network (`--network host`): the harness's pod IPs are the
loopback addresses 127.0.0.N, the API server, moto and the registry listen on loopback, and
containerPorts are the host's ports (the runner gives each pod its own metrics and torchrun
ports, as for processes).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kubetune_api import contract
from support.kube_emulator import EmulatorThread, JsonDict
from support.operator_process import OperatorProcess
from support.pod_runner import (
    POD_MARKER_ENV,
    ContainerConfigError,
    Mounts,
    PodRunner,
    expand,
)

PODMAN = ("podman", "--runtime", "runc")


class Unsupported(ValueError):
    """A pod spec field the container runner cannot honour (the message names it)."""


@dataclass(frozen=True)
class PodFiles:
    """What the runner prepared on disk for one pod: a folder per volume (ConfigMap and
    Secret keys written as files, emptyDirs empty), and the termination-message file."""
    volumes: dict[str, Path]
    termination_log: Path


# Fields whose meaning the runner carries out itself (not by a podman option), or that say
# what a kubelet does anyway on one node.
POD_FIELDS_HONOURED_BY_RUNNER = {
    "containers", "volumes", "securityContext",
    "restartPolicy",                  # Never only (checked): the Job controller replaces pods
    "hostname", "subdomain",          # the runner resolves <hostname>.<subdomain> to pod IPs
    "terminationGracePeriodSeconds",  # SIGTERM, then SIGKILL after it (PodRunner)
    "automountServiceAccountToken",   # False only (checked): nothing mounted
    "enableServiceLinks",             # False only (checked): no service variables
}
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports",
    "resources", "volumeMounts", "terminationMessagePath", "terminationMessagePolicy",
    "securityContext",
}
POD_SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "seccompProfile"}
CONTAINER_SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "readOnlyRootFilesystem",
                             "allowPrivilegeEscalation", "capabilities", "seccompProfile"}
VOLUME_SOURCES = {"configMap", "secret", "emptyDir"}
MOUNT_FIELDS = {"name", "mountPath", "readOnly"}


def _refuse_unknown(found: JsonDict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(found) - allowed)
    if unknown:
        raise Unsupported(f"{where}.{unknown[0]}: the container runner cannot honour it")


def _require(value: object, expected: object, field: str) -> None:
    if value is not None and value != expected:
        raise Unsupported(f"{field}: only {expected!r} is honoured, not {value!r}")


def pod_options(pod: JsonDict, env_names: list[str], files: PodFiles) -> list[str]:
    """`podman run` options for the pod's one container, up to (not including) the image.

    env_names: the variables the runner resolved (env, envFrom, fieldRefs); podman takes
    their values from its own environment (`-e NAME`), so no value shows in a command line.
    """
    spec = pod["spec"]
    set_fields = {k for k, v in spec.items() if v is not None}
    _refuse_unknown({k: 1 for k in set_fields}, POD_FIELDS_HONOURED_BY_RUNNER, "spec")
    if len(spec["containers"]) != 1:
        raise Unsupported("spec.containers: exactly one container is honoured")
    _require(spec.get("restartPolicy"), "Never", "spec.restartPolicy")
    _require(spec.get("automountServiceAccountToken"), False, "spec.automountServiceAccountToken")
    _require(spec.get("enableServiceLinks"), False, "spec.enableServiceLinks")
    container = spec["containers"][0]
    _refuse_unknown(container, CONTAINER_FIELDS, "spec.containers[0]")
    _require(container.get("imagePullPolicy"), "IfNotPresent", "spec.containers[0].imagePullPolicy")
    options = ["--network", "host", "--hostname", spec.get("hostname", pod["metadata"]["name"])]
    options += _security_options(spec.get("securityContext") or {},
                                 container.get("securityContext") or {})
    options += _resource_options(container.get("resources") or {})
    options += _volume_options(spec, container, files)
    options += ["-v", f"{files.termination_log}:"
                f"{container.get('terminationMessagePath', contract.DEFAULT_TERMINATION_LOG)}"]
    _require(container.get("terminationMessagePolicy", "File") in ("File", "FallbackToLogsOnError"),
             True, "spec.containers[0].terminationMessagePolicy")  # the runner reads both
    for port in container.get("ports", []):
        _refuse_unknown(port, {"name", "containerPort", "protocol"},
                        f"spec.containers[0].ports[{port.get('name')}]")
        _require(port.get("protocol", "TCP"), "TCP", "spec.containers[0].ports[].protocol")
    for name in env_names:
        options += ["-e", name]
    if container.get("command"):
        options += ["--entrypoint", json.dumps(container["command"])]
    return options


def _security_options(pod_context: JsonDict, context: JsonDict) -> list[str]:
    _refuse_unknown(pod_context, POD_SECURITY_FIELDS, "spec.securityContext")
    _refuse_unknown(context, CONTAINER_SECURITY_FIELDS, "spec.containers[0].securityContext")
    merged = {**pod_context, **context}  # the container's settings win, as in Kubernetes
    options = []
    user = merged.get("runAsUser")
    if user is not None:
        group = merged.get("runAsGroup")
        options += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if merged.get("runAsNonRoot"):
        if user is None:  # the kubelet checks the image's USER; do the same
            options += ["--check-non-root"]
        elif int(user) == 0:
            raise Unsupported("spec.securityContext.runAsNonRoot: runAsUser is 0")
    if "fsGroup" in pod_context:
        options += ["--group-add", str(pod_context["fsGroup"])]
    for where, profile in (("spec.securityContext", pod_context.get("seccompProfile")),
                           ("spec.containers[0].securityContext", context.get("seccompProfile"))):
        if profile is not None:
            _require(profile, {"type": "RuntimeDefault"}, f"{where}.seccompProfile")
    if context.get("readOnlyRootFilesystem"):
        # podman's --read-only adds writable tmpfs on /tmp, /run...; Kubernetes does not.
        options += ["--read-only", "--read-only-tmpfs=false"]
    if context.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    capabilities = context.get("capabilities") or {}
    _refuse_unknown(capabilities, {"drop", "add"},
                    "spec.containers[0].securityContext.capabilities")
    options += [f"--cap-drop={cap}" for cap in capabilities.get("drop", [])]
    options += [f"--cap-add={cap}" for cap in capabilities.get("add", [])]
    return options


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _resource_options(resources: JsonDict) -> list[str]:
    """As the kubelet sets cgroups: requests.cpu → CPU shares, limits.cpu → a CFS quota,
    limits.memory → the memory limit; requests.memory is for the scheduler only."""
    _refuse_unknown(resources, {"requests", "limits"}, "spec.containers[0].resources")
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for where, found in (("requests", requests), ("limits", limits)):
        _refuse_unknown(found, {"cpu", "memory"}, f"spec.containers[0].resources.{where}")
    options = []
    if "cpu" in requests:
        options += ["--cpu-shares", str(max(2, int(_cpus(requests["cpu"]) * 1024)))]
    if "cpu" in limits:
        options += ["--cpus", str(_cpus(limits["cpu"]))]
    if "memory" in limits:
        options += ["--memory", _bytes(limits["memory"])]
    return options


def _bytes(quantity: str) -> str:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return str(int(float(quantity[:-len(unit)]) * factor))
    return str(int(float(quantity)))


def _volume_options(spec: JsonDict, container: JsonDict, files: PodFiles) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    options = []
    for mount in container.get("volumeMounts", []):
        where = f"spec.containers[0].volumeMounts[{mount['name']}]"
        _refuse_unknown(mount, MOUNT_FIELDS, where)
        volume = volumes[mount["name"]]
        source = sorted(set(volume) - {"name"})
        if len(source) != 1 or source[0] not in VOLUME_SOURCES:
            raise Unsupported(f"spec.volumes[{mount['name']}].{source[0] if source else '?'}: "
                              "the container runner cannot honour it")
        kind = source[0]
        if kind == "emptyDir" and (volume["emptyDir"] or {}).get("medium") == "Memory":
            size = (volume["emptyDir"] or {}).get("sizeLimit")
            options += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"
                        + (f",size={_bytes(size)}" if size else "")]
            continue
        if kind in ("configMap", "secret"):
            _refuse_unknown(volume[kind], {"name", "secretName", "defaultMode", "items",
                                           "optional"}, f"spec.volumes[{mount['name']}].{kind}")
        read_only = mount.get("readOnly", False) or kind in ("configMap", "secret")
        options += ["-v", f"{files.volumes[mount['name']]}:{mount['mountPath']}"
                    + (":ro" if read_only else "")]
    return options


def prepare_volume(volume: JsonDict, folder: Path, data: dict[str, str],
                   fs_group: int | None) -> None:
    """A volume's folder as the kubelet lays it out: emptyDirs writable by all (0777), keys
    (or the listed items) as files with defaultMode, group-owned by fsGroup."""
    folder.chmod(0o777)
    source = volume.get("configMap") or volume.get("secret")
    if source is None:
        return
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    mode = int(source.get("defaultMode", 0o644))
    for item in items:
        if item["key"] not in data:
            continue
        path = folder / item["path"]
        path.write_text(data[item["key"]])
        path.chmod(mode)
        if fs_group is not None:
            os.chown(path, 0, fs_group)


class ContainerPodRunner(PodRunner):
    """PodRunner whose kubelet runs each pod from its image with podman (runc).

    images: the pod's `image` as the operator wrote it → the reference podman runs (the
    registry digest it was pulled by); an image not in it is refused.
    """

    def __init__(self, api: EmulatorThread, workdir: Path, images: dict[str, str]) -> None:
        super().__init__(api, workdir)
        self.images = images

    def _start(self, pod: JsonDict) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        pod_dir = self._pod_dir(pod)
        ip = self._ip_for(pod)
        try:
            files = self._pod_files(pod, container, pod_dir)
            env = self._env(pod, container, ip)
            image = self.images.get(container["image"])
            if image is None:
                raise Unsupported(f"spec.containers[0].image: {container['image']} was not "
                                  f"built and pulled (have {sorted(self.images)})")
            options = pod_options(pod, sorted(env), files)
        except ContainerConfigError as exc:
            self._refuse_config(pod, exc)
            return
        args = [expand(a, env) for a in container.get("args", [])]
        argv = [*PODMAN, "run", "--rm", "--name", f"kt-{meta['uid']}", *options, image, *args]
        log_path = pod_dir / "log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                       stderr=subprocess.STDOUT)
        self._started(pod, process, log_path, files.termination_log)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        # The marker finds a container's processes only where its env reached them; removing
        # the containers by name leaves none behind whatever happened.
        names = [f"kt-{uid}" for uid in self.processes]
        if names:
            subprocess.run([*PODMAN, "rm", "--force", "--time", "0", "--ignore", *names],
                           capture_output=True)

    def _pod_files(self, pod: JsonDict, container: JsonDict, pod_dir: Path) -> PodFiles:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        folders = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            folder = pod_dir / "volumes" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            data: dict[str, str] = {}
            for kind, resource in (("configMap", "v1/configmaps"), ("secret", "v1/secrets")):
                if kind in volume:
                    source = volume[kind]
                    data = self._data(resource, pod["metadata"]["namespace"],
                                      source.get("name") or source.get("secretName"),
                                      source.get("optional", False))
            prepare_volume(volume, folder, data, fs_group)
            folders[mount["name"]] = folder
        termination_log = pod_dir / "termination-log"
        termination_log.write_text("")
        termination_log.chmod(0o666)
        return PodFiles(folders, termination_log)

    def _env(self, pod: JsonDict, container: JsonDict, ip: str) -> dict[str, str]:
        """The pod's own variables only (none of the harness machine's), resolved as the
        process runner resolves them, plus the marker that finds the container's processes."""
        resolved = self._container_env(pod, container, Mounts(Path()), ip)
        names = {var["name"] for var in container.get("env", [])}
        for source in container.get("envFrom", []):
            names |= {source.get("prefix", "") + key for key in self._env_source(
                pod["metadata"]["namespace"], source)}
        names |= {"HOSTNAME", "GLOO_SOCKET_IFNAME", POD_MARKER_ENV, "KUBETUNE_METRICS_PORT"}
        return {name: resolved[name] for name in sorted(names) if name in resolved}


class OperatorContainer(OperatorProcess):
    """The operator from its image, as the chart's Deployment runs it: uid 65532, read-only
    root filesystem, an emptyDir on /tmp, the kubeconfig as a read-only file."""

    KUBECONFIG_IN_CONTAINER = "/etc/kubetune-e2e/kubeconfig"

    def __init__(self, api: EmulatorThread, workdir: Path, image: str, **env: str) -> None:
        super().__init__(api, workdir, **env)
        self.image = image
        self.name = f"kt-operator-{os.getpid()}-{id(self)}"
        self.kubeconfig.chmod(0o644)

    def start(self) -> OperatorContainer:
        tmp = self.log_path.parent / "operator-tmp"
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o777)
        env = {k: v for k, v in self.env.items() if k.startswith("KUBETUNE_")}
        env["KUBECONFIG"] = self.KUBECONFIG_IN_CONTAINER
        argv = [*PODMAN, "run", "--rm", "--name", self.name, "--network", "host",
                "--user", "65532:65532", "--read-only", "--read-only-tmpfs=false",
                "--cap-drop=ALL", "--security-opt", "no-new-privileges",
                "-v", f"{tmp}:/tmp", "-v", f"{self.kubeconfig}:{self.KUBECONFIG_IN_CONTAINER}:ro",
                *(flag for name in sorted(env) for flag in ("-e", name)), self.image]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        subprocess.run([*PODMAN, "kill", self.name], capture_output=True)
        super().kill()
