"""The Job controller and kubelet of the e2e harness: pods become local processes.

`PodRunner` polls the emulated API server (a background thread, every `interval` seconds):

- Job controller: for each Indexed Job it creates one pod per completion index (once per
  run of the Job: a pod that fails or is deleted is not replaced, as with `backoffLimit: 0`)
  and keeps the Job's status (active/succeeded/failed, Complete/Failed conditions). A failed
  pod past `backoffLimit` makes the Job `FailureTarget` first: the controller deletes the
  surviving pods gracefully and writes `Failed` only once none is left terminating.
  Suspension as the real controller does it: `spec.suspend` true deletes the Job's active
  pods gracefully (SIGTERM; not counted as failed) and sets the `Suspended` condition
  (`JobSuspended`); false again sets it False (`JobResumed`), resets `status.startTime` and
  creates pods again for every index without a succeeded pod, once the old ones are gone
  (`podReplacementPolicy: Failed` waits for terminating pods). `status.startTime` is written
  in the status update of the sync that creates the pods, never while suspended (syncJob's
  "Job first start"). `lag(job)` stops syncing one Job until `catch_up(job)`: a controller
  behind its work queue, so the fault table can show the operator the moment between
  Kueue's unsuspend and the controller's sync;
- kubelet: each pod runs its container's real command as a process in the repository root
  (the image's working directory), with the pod's environment — `$(VAR)` expansion, fieldRefs
  (the completion index annotation), values and `envFrom` of Secrets and ConfigMaps — and its
  ConfigMap/Secret volumes written to a per-pod directory that replaces the mount path in the
  command and env. The pod's status carries phase, podIP, container state and exit code, and
  the termination message file (or the log tail on error). A missing Secret/ConfigMap leaves
  the pod waiting with `CreateContainerConfigError`, retried on every poll.
- network: every pod gets its own loopback address 127.0.0.N as podIP; env values that name a
  pod by `<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]` are replaced by its IP
  (the processes have no cluster DNS). Ports are shared by all pods on this machine, so pod k
  of a Job gets `KUBETUNE_METRICS_PORT` = its `metrics` containerPort + k (docs/contract.md):
  rank 0 keeps the port the operator scrapes. Each Job's gang gets its own free torchrun port
  (`PET_MASTER_PORT`), so gangs and other processes on the machine never clash on 29500.
- deletion: a deleted pod's main process gets SIGTERM; after the grace period every process
  of the pod gets SIGKILL; then the pod is removed (grace 0).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kubetune_api import contract
from support.kube_emulator import EmulatorThread, JsonDict, now_stamp
from support.net import free_port
from support.operator_process import COMPLETION_INDEX, JOBS, PODS, job_pod

ROOT = Path(__file__).resolve().parents[2]
SECRETS = "v1/secrets"
CONFIG_MAPS = "v1/configmaps"
# Variables of the machine running the harness that no pod would see.
HOST_ONLY_PREFIXES = ("AWS_", "KUBE", "PET_", "GOOGLE_APPLICATION_CREDENTIALS")
NODE_ENV = {"GLOO_SOCKET_IFNAME": "lo"}  # the pod network is the loopback interface
# Every process of a pod inherits this marker: the harness's stand-in for the container's
# cgroup, so that killing a container kills all of it (torchrun starts its workers in new
# sessions, out of reach of a process-group kill).
POD_MARKER_ENV = "KUBETUNE_E2E_POD_UID"
MESSAGE_LIMIT = 4096  # as the kubelet's termination message limit
LOG_TAIL_LINES = 80
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ContainerConfigError(Exception):
    """What the kubelet reports as CreateContainerConfigError (and retries)."""


# --- environment and paths ---------------------------------------------------------------------

def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names expand, others stay, `$$` escapes."""
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])
    return _VAR_REF.sub(replace, value)


def field_ref(pod: JsonDict, path: str, pod_ip: str) -> str:
    meta = pod["metadata"]
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return str((meta.get(match[1]) or {}).get(match[2], ""))
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta.get("namespace", ""),
              "metadata.uid": meta.get("uid", ""), "status.podIP": pod_ip,
              "spec.nodeName": "localhost"}
    if path not in simple:
        raise ContainerConfigError(f"fieldRef {path!r} is not emulated")
    return simple[path]


class Mounts:
    """The pod's volumes on local disk, and the rewrite of their container paths."""

    def __init__(self, pod_dir: Path) -> None:
        self.pod_dir = pod_dir
        self.paths: dict[str, Path] = {}  # container mount path -> local directory

    def localize(self, value: str) -> str:
        for mount in sorted(self.paths, key=len, reverse=True):
            if value == mount or value.startswith(mount.rstrip("/") + "/"):
                return str(self.paths[mount]) + value[len(mount):]
        return value


@dataclass
class PodProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    termination_log: Path
    grace_seconds: float
    kill_at: float | None = None  # set once the pod is being deleted
    reported: bool = False


@dataclass
class PodRunner:
    api: EmulatorThread
    workdir: Path
    interval: float = 0.2
    cwd: Path = ROOT
    processes: dict[str, PodProcess] = field(default_factory=dict)  # pod uid -> process
    _created: set[tuple[str, int]] = field(default_factory=set)  # (job uid, index)
    _ips: dict[str, str] = field(default_factory=dict)  # pod uid -> IP
    _ip_counter: itertools.count[int] = field(default_factory=lambda: itertools.count(2))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)  # uids of pods whose node is gone
    _taint_evictions: dict[str, float] = field(default_factory=dict)  # pod uid -> when
    _master_ports: dict[str, int] = field(default_factory=dict)  # Job uid -> torchrun port
    exit_codes: dict[str, int] = field(default_factory=dict)  # pod name -> its last exit code
    hold_step: int | None = None  # the trainer's pacing seam (kubetune_trainer/hold.py)
    # Jobs the Job controller has not synced yet (a controller behind its work queue): their
    # pods and status stay as they are until `catch_up`.
    lagging: set[str] = field(default_factory=set)

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> PodRunner:
        if hasattr(self.api.emulator, "pod_log_path"):  # the kubelet serves pod logs
            self.api.emulator.pod_log_path = self.log_path
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for uid, proc in self.processes.items():
            kill_container(uid, proc.process)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception as exc:  # surfaced to tests through .errors
                self.errors.append(exc)

    def sync(self) -> None:
        if self._taint_evictions:
            self._evict_tainted()
        for job in self.api.find(JOBS):
            self._sync_job(job)
        pods = self.api.find(PODS)
        for pod in pods:
            self._sync_pod(pod)
        alive = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self.processes if u not in alive]:
            self._stop_process(uid, self.processes[uid])  # removed without a grace period
            if self.processes[uid].process.poll() is not None:
                del self.processes[uid]

    def crash(self, pod_name: str) -> None:
        """SIGKILL every process of the pod's container, as an OOM kill would."""
        pod = self._pod(pod_name)
        kill_container(pod["metadata"]["uid"], self.processes[pod["metadata"]["uid"]].process)

    def lose_node(self, pod_name: str, toleration_seconds: float = 10.0) -> None:
        """The pod's node goes away, as on current clusters: its processes vanish without a
        word (the peers see a dead connection); the node lifecycle controller marks the pod
        Ready=False (MarkPodsNotReady) and taints the node `unreachable:NoExecute`; after the
        pod's toleration of that taint (300 s by default: DefaultTolerationSeconds; short
        here) the taint eviction controller deletes it with a DisruptionTarget condition
        (DeletionByTaintManager). No kubelet confirms any deletion: it stays Terminating
        until someone force-deletes it."""
        pod = self._pod(pod_name)
        uid = pod["metadata"]["uid"]
        self.lost.add(uid)
        kill_container(uid, self.processes[uid].process)
        conditions = [c for c in pod.get("status", {}).get("conditions") or []
                      if c["type"] != "Ready"]
        conditions.append({"type": "Ready", "status": "False", "lastTransitionTime": now_stamp()})
        self.api.patch(PODS, pod["metadata"]["namespace"], pod_name,
                       {"status": {"conditions": conditions}}, subresource="status")
        self._taint_evictions[uid] = time.monotonic() + toleration_seconds

    def _evict_tainted(self) -> None:
        """The taint eviction controller: pods of a lost node whose toleration ran out."""
        for pod in self.api.find(PODS):
            uid, meta = pod["metadata"]["uid"], pod["metadata"]
            due = self._taint_evictions.get(uid)
            if due is None or time.monotonic() < due:
                continue
            del self._taint_evictions[uid]
            if meta.get("deletionTimestamp"):
                continue  # being deleted already (its Job failed)
            conditions = [*(pod.get("status", {}).get("conditions") or []), {
                "type": "DisruptionTarget", "status": "True",
                "reason": "DeletionByTaintManager",
                "message": "Taint manager: deleting due to NoExecute taint",
                "lastTransitionTime": now_stamp()}]
            self.api.patch(PODS, meta["namespace"], meta["name"],
                           {"status": {"conditions": conditions}}, subresource="status")
            self.api.delete(PODS, meta["namespace"], meta["name"])

    def evict(self, pod_name: str) -> None:
        """An eviction (drain, preemption): DisruptionTarget, then a graceful delete."""
        pod = self._pod(pod_name)
        namespace = pod["metadata"]["namespace"]
        conditions = [*pod.get("status", {}).get("conditions", []), {
            "type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting", "lastTransitionTime": now_stamp()}]
        self.api.patch(PODS, namespace, pod_name, {"status": {"conditions": conditions}},
                       subresource="status")
        self.api.delete(PODS, namespace, pod_name)

    def lag(self, job_name: str) -> None:
        self.lagging.add(job_name)

    def catch_up(self, job_name: str) -> None:
        self.lagging.discard(job_name)

    # --- pacing (kubetune_trainer/hold.py) -------------------------------------------------------

    @property
    def hold_gate(self) -> Path:
        return self.workdir / "hold-gate"

    def hold_at(self, step: int) -> None:
        """Pods started from now on stop after optimizer step `step` until `release()`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hold_gate.write_text(str(step))
        self.hold_step = step

    def held_ranks(self) -> dict[int, str]:
        """rank -> what it wrote at the hold: its step, then " sigterm" once SIGTERM ended
        its hold; for every rank that reached the hold."""
        return {int(path.name.rsplit("rank", 1)[1]): path.read_text()
                for path in self.workdir.glob(f"{self.hold_gate.name}.held-rank*")}

    def release(self) -> None:
        self.hold_gate.unlink(missing_ok=True)

    def pause(self, pod_name: str) -> None:
        """SIGSTOP every process of the pod's container: a frozen rank (a hung collective, a
        stuck mount). Its peers block in their next collective; its sockets stay open."""
        self._signal_container(pod_name, signal.SIGSTOP)

    def unpause(self, pod_name: str) -> None:
        self._signal_container(pod_name, signal.SIGCONT)

    def _pod(self, name: str) -> JsonDict:
        """The pod called `name`, whatever its namespace (fault injection by name)."""
        return next(p for p in self.api.find(PODS) if p["metadata"]["name"] == name)

    def _signal_container(self, pod_name: str, signum: int) -> None:
        pod = self._pod(pod_name)
        uid = pod["metadata"]["uid"]
        for process in container_processes(uid, self.processes[uid].process):
            with contextlib.suppress(psutil.Error):
                process.send_signal(signum)

    def log_path(self, namespace: str, pod_name: str) -> Path:
        return self.workdir / f"{namespace}-{pod_name}" / "log"

    def log(self, pod_name: str, namespace: str = "default") -> str:
        """Everything the pod's processes wrote (what `kubectl logs` would show)."""
        path = self.log_path(namespace, pod_name)
        return path.read_text(errors="replace") if path.exists() else ""

    def output_size(self) -> int:
        """Bytes the pods have written so far: grows while any rank makes progress."""
        return sum(path.stat().st_size for path in self.workdir.glob("*/log"))

    def logs(self, tail: int = 3000) -> str:
        return "".join(f"--- {path.parent.name} ---\n{path.read_text(errors='replace')[-tail:]}\n"
                       for path in sorted(self.workdir.glob("*/log")))

    # --- Job controller --------------------------------------------------------------------------

    def _sync_job(self, job: JsonDict) -> None:
        spec, meta = job["spec"], job["metadata"]
        if spec.get("completionMode") != "Indexed" or _job_finished(job) \
                or meta["name"] in self.lagging:
            return
        pods = self.api.find(PODS, meta["namespace"], labels=f"job-name={meta['name']}")
        if spec.get("suspend"):
            self._suspend(job, pods)
        elif not any(p["metadata"].get("deletionTimestamp") for p in pods):
            # podReplacementPolicy: Failed: no new pod while an old one still terminates.
            succeeded = {_completion_index(p) for p in pods
                         if p.get("status", {}).get("phase") == "Succeeded"}
            for index in range(int(spec["completions"])):
                if (meta["uid"], index) not in self._created and index not in succeeded:
                    self._created.add((meta["uid"], index))
                    self.api.create(PODS, job_pod(job, index))
        status = job_status(job, self.api.find(PODS, meta["namespace"],
                                               labels=f"job-name={meta['name']}"))
        if any(c["type"] == "FailureTarget" for c in status.get("conditions", [])):
            self._delete_active(job, pods)  # deleteActivePods: the survivors of a failed Job
        if status != job.get("status", {}):
            # A merge patch keeps keys it does not name: counts that fell to 0 and a startTime
            # Kueue cleared must be removed by name.
            cleared = dict.fromkeys(("active", "succeeded", "failed", "startTime"))
            self.api.patch(JOBS, meta["namespace"], meta["name"],
                           {"status": {**cleared, **status}}, subresource="status")

    def _suspend(self, job: JsonDict, pods: list[JsonDict]) -> None:
        """The real controller's manageJob for a suspended Job: delete its active pods
        (it drops their tracking finalizer first, so they never count as failed); a resume
        creates every index without a succeeded pod again."""
        self._delete_active(job, pods)
        self._created -= {key for key in self._created if key[0] == job["metadata"]["uid"]}

    def _delete_active(self, job: JsonDict, pods: list[JsonDict]) -> None:
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp") or pod.get("status", {}).get(
                    "phase") in ("Succeeded", "Failed"):
                continue
            with contextlib.suppress(Exception):  # gone already
                self.api.delete(PODS, job["metadata"]["namespace"], pod["metadata"]["name"])

    # --- kubelet ---------------------------------------------------------------------------------

    def _sync_pod(self, pod: JsonDict) -> None:
        meta = pod["metadata"]
        if meta["uid"] in self.lost:
            return  # no kubelet answers for it: it stays as it was, Terminating once deleted
        proc = self.processes.get(meta["uid"])
        if meta.get("deletionTimestamp"):
            if proc is not None:
                self._stop_process(meta["uid"], proc)
            if proc is None or proc.process.poll() is not None:
                self._report_exit(pod, proc)
                self.api.delete(PODS, meta["namespace"], meta["name"], grace_seconds=0)
                self.processes.pop(meta["uid"], None)
            return
        if proc is None and pod.get("status", {}).get("phase") in (None, "Pending"):
            self._start(pod)
        elif proc is not None and proc.process.poll() is not None and not proc.reported:
            self._report_exit(pod, proc)

    def _pod_dir(self, pod: JsonDict) -> Path:
        """The pod's own folder on this machine (its volumes, log, termination log)."""
        meta = pod["metadata"]
        pod_dir = self.workdir / f"{meta['namespace']}-{meta['name']}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        return pod_dir

    def _refuse_config(self, pod: JsonDict, exc: ContainerConfigError) -> None:
        """What the kubelet shows for a container it cannot configure: Pending, waiting."""
        self._write_status(pod, "Pending", {"waiting": {
            "reason": "CreateContainerConfigError", "message": str(exc)}})

    def _started(self, pod: JsonDict, process: subprocess.Popen[bytes], log_path: Path,
                 termination_log: Path) -> None:
        grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.processes[pod["metadata"]["uid"]] = PodProcess(process, log_path, termination_log,
                                                            grace)
        self._write_status(pod, "Running", {"running": {"startedAt": now_stamp()}})

    def _start(self, pod: JsonDict) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        pod_dir = self._pod_dir(pod)
        ip = self._ip_for(pod)
        try:
            mounts = self._mount_volumes(pod, container, pod_dir)
            env = self._container_env(pod, container, mounts, ip)
        except ContainerConfigError as exc:
            self._refuse_config(pod, exc)
            return
        # The kubelet gives every container its own termination-log file; a path outside the
        # pod's volumes must not become the machine's shared /dev/termination-log.
        message_path = container.get("terminationMessagePath", contract.DEFAULT_TERMINATION_LOG)
        localized = mounts.localize(message_path)
        termination_log = (Path(localized) if localized != message_path
                           else pod_dir / "termination-log")
        termination_log.parent.mkdir(parents=True, exist_ok=True)
        env[contract.TERMINATION_LOG_ENV] = str(termination_log)
        argv = [expand(a, env) for a in [*container.get("command", []),
                                          *container.get("args", [])]]
        argv = [sys.executable if argv[0] == "python" else argv[0],
                *(mounts.localize(a) for a in argv[1:])]
        log_path = self.log_path(meta["namespace"], meta["name"])
        with log_path.open("ab") as log:
            process = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        self._started(pod, process, log_path, termination_log)

    def _container_env(self, pod: JsonDict, container: JsonDict, mounts: Mounts,
                       ip: str) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(HOST_ONLY_PREFIXES)}
        env.update(NODE_ENV, HOSTNAME=pod["spec"].get("hostname", pod["metadata"]["name"]))
        env[POD_MARKER_ENV] = pod["metadata"]["uid"]
        if "/tmp" in mounts.paths:
            env["TMPDIR"] = str(mounts.paths["/tmp"])
        for source in container.get("envFrom", []):
            env.update({source.get("prefix", "") + k: v for k, v in self._env_source(
                namespace, source).items()})
        for var in container.get("env", []):
            if "valueFrom" in var:
                value = self._value_from(pod, var["valueFrom"], ip)
            else:
                value = expand(var.get("value", ""), env)
            env[var["name"]] = mounts.localize(self._resolve(pod, value))
        if self.hold_step is not None:
            env.update(KUBETUNE_HOLD_AT_STEP=str(self.hold_step),
                       KUBETUNE_HOLD_FILE=str(self.hold_gate))
        if contract.PET_MASTER_PORT in env:
            # One port for the whole machine would clash with anything else on it (another
            # gang, another test run): each Job's gang gets its own free port instead.
            env[contract.PET_MASTER_PORT] = str(self._master_port(pod))
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        if "metrics" in ports:
            env["KUBETUNE_METRICS_PORT"] = str(ports["metrics"] + _completion_index(pod))
        return env

    def _env_source(self, namespace: str, source: JsonDict) -> dict[str, str]:
        if "secretRef" in source:
            ref = source["secretRef"]
            return self._data(SECRETS, namespace, ref["name"], ref.get("optional", False))
        ref = source["configMapRef"]
        return self._data(CONFIG_MAPS, namespace, ref["name"], ref.get("optional", False))

    def _value_from(self, pod: JsonDict, source: JsonDict, ip: str) -> str:
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            return field_ref(pod, source["fieldRef"]["fieldPath"], ip)
        kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
        ref = source[kind]
        data = self._data(SECRETS if kind == "secretKeyRef" else CONFIG_MAPS, namespace,
                          ref["name"], ref.get("optional", False))
        if ref["key"] not in data and not ref.get("optional", False):
            raise ContainerConfigError(f"couldn't find key {ref['key']} in {ref['name']}")
        return data.get(ref["key"], "")

    def _data(self, resource: str, namespace: str, name: str,
              optional: bool = False) -> dict[str, str]:
        obj = self.api.get(resource, namespace, name)
        kind = resource.rsplit("/", 1)[-1].rstrip("s")
        if obj is None:
            if optional:
                return {}
            raise ContainerConfigError(f'{kind} "{name}" not found')
        data = dict(obj.get("data") or {})
        if resource == SECRETS:
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
            data.update(obj.get("stringData") or {})
        return data

    def _mount_volumes(self, pod: JsonDict, container: JsonDict, pod_dir: Path) -> Mounts:
        mounts = Mounts(pod_dir)
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        namespace = pod["metadata"]["namespace"]
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            local = pod_dir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for kind, resource in (("configMap", CONFIG_MAPS), ("secret", SECRETS)):
                if kind in volume:
                    source = volume[kind]
                    name = source.get("name") or source.get("secretName")
                    data = self._data(resource, namespace, name, source.get("optional", False))
                    for key, value in data.items():
                        (local / key).write_text(value)
            mounts.paths[mount["mountPath"]] = local
        return mounts

    # --- network ---------------------------------------------------------------------------------

    def _master_port(self, pod: JsonDict) -> int:
        refs = pod["metadata"].get("ownerReferences") or [{}]
        job = str(refs[0].get("uid") or pod["metadata"]["uid"])
        if job not in self._master_ports:
            self._master_ports[job] = free_port()
        return self._master_ports[job]

    def _ip_for(self, pod: JsonDict) -> str:
        uid = pod["metadata"]["uid"]
        if uid not in self._ips:
            self._ips[uid] = f"127.0.0.{2 + next(self._ip_counter) % 250}"
        return self._ips[uid]

    def _resolve(self, pod: JsonDict, value: str) -> str:
        """A pod DNS name (`<hostname>.<subdomain>...`) → that pod's IP; other values as is."""
        parts = value.split(".")
        namespace = pod["metadata"]["namespace"]
        if len(parts) < 2 or parts[2:] not in ([], [namespace], [namespace, "svc"],
                                               [namespace, "svc", "cluster", "local"]):
            return value
        for other in self.api.find(PODS, namespace):
            spec = other["spec"]
            if (spec.get("hostname"), spec.get("subdomain")) == (parts[0], parts[1]) \
                    and self.api.get("v1/services", namespace, parts[1]) is not None:
                return self._ip_for(other)
        return value

    # --- termination -----------------------------------------------------------------------------

    def _stop_process(self, uid: str, proc: PodProcess) -> None:
        if proc.process.poll() is not None:
            return
        if proc.kill_at is None:
            proc.kill_at = time.monotonic() + proc.grace_seconds
            proc.process.send_signal(signal.SIGTERM)  # to the container's main process
        elif time.monotonic() >= proc.kill_at:
            kill_container(uid, proc.process)

    def _report_exit(self, pod: JsonDict, proc: PodProcess | None) -> None:
        if proc is None or proc.reported:
            return
        proc.reported = True
        kill_container(pod["metadata"]["uid"], proc.process)  # no orphans outlive the container
        code = proc.process.returncode
        code = 128 - code if code < 0 else code
        self.exit_codes[pod["metadata"]["name"]] = code
        message = termination_message(proc, pod, code)
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "message": message, "finishedAt": now_stamp()}
        self._write_status(pod, "Succeeded" if code == 0 else "Failed",
                           {"terminated": terminated})

    def _write_status(self, pod: JsonDict, phase: str, state: JsonDict) -> None:
        meta = pod["metadata"]
        old = pod.get("status", {})
        status = {"phase": phase, "podIP": self._ip_for(pod), "hostIP": "127.0.0.1",
                  "containerStatuses": [{
                      "name": pod["spec"]["containers"][0]["name"], "state": state,
                      "ready": phase == "Running", "restartCount": 0,
                      "image": pod["spec"]["containers"][0].get("image", "")}],
                  "conditions": _ready_condition(old, phase == "Running")}
        if {key: old.get(key) for key in status} != status:
            with contextlib.suppress(Exception):  # the pod may be gone already
                self.api.patch(PODS, meta["namespace"], meta["name"], {"status": status},
                               subresource="status")


# --- pure helpers ------------------------------------------------------------------------------

def job_status(job: JsonDict, pods: list[JsonDict]) -> JsonDict:
    """Counts, the Suspended condition and the Complete/FailureTarget/Failed conditions of an
    Indexed Job (pods being deleted count as neither active nor failed)."""
    phases = [p.get("status", {}).get("phase") for p in pods
              if not p["metadata"].get("deletionTimestamp")]
    succeeded, failed = phases.count("Succeeded"), phases.count("Failed")
    status: JsonDict = {"active": phases.count("Running") + phases.count("Pending") +
                        phases.count(None), "succeeded": succeeded, "failed": failed}
    status = {k: v for k, v in status.items() if v}
    old_status = job.get("status") or {}
    old = {c["type"]: c for c in old_status.get("conditions") or []}
    if old_status.get("startTime"):
        status["startTime"] = old_status["startTime"]
    elif not job["spec"].get("suspend"):
        status["startTime"] = now_stamp()  # syncJob: "Job first start", never while suspended
    conditions = []
    if job["spec"].get("suspend"):
        conditions.append(_condition("Suspended", "JobSuspended", "Job suspended"))
    elif "Suspended" in old:
        conditions.append(_condition("Suspended", "JobResumed", "Job resumed", "False"))
        if old["Suspended"]["status"] == "True":
            status["startTime"] = now_stamp()  # a resumed Job's clock starts again
    failing = failed > int(job["spec"].get("backoffLimit", 6)) or (
        old.get("FailureTarget", {}).get("status") == "True")
    if failing:
        # syncJob: FailureTarget first; the controller deletes the active pods; Failed only
        # once none is left terminating (delayTerminalCondition).
        target = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        conditions.append(_condition("FailureTarget", *target))
        terminating = [p for p in pods if p["metadata"].get("deletionTimestamp")
                       and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
        if not terminating and not status.get("active"):
            conditions.append(_condition("Failed", *target))
    elif succeeded >= int(job["spec"]["completions"]):
        conditions.append(_condition("Complete", "", ""))
    for cond in conditions:  # the time moves only when the status flips
        if cond["type"] in old and old[cond["type"]]["status"] == cond["status"]:
            cond["lastTransitionTime"] = old[cond["type"]]["lastTransitionTime"]
    if conditions:
        status["conditions"] = conditions
    return status


def termination_message(proc: PodProcess, pod: JsonDict, code: int) -> str:
    message = ""
    with contextlib.suppress(OSError):
        message = proc.termination_log.read_text()[:MESSAGE_LIMIT]
    policy = pod["spec"]["containers"][0].get("terminationMessagePolicy", "File")
    if not message and code != 0 and policy == "FallbackToLogsOnError":
        lines = proc.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        message = "\n".join(lines)[-MESSAGE_LIMIT:]
    return message


def container_processes(uid: str, main: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The container's main process and every process carrying its marker."""
    found = []
    with contextlib.suppress(psutil.Error):
        found.append(psutil.Process(main.pid))
    for other in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if other.pid != main.pid and other.environ().get(POD_MARKER_ENV) == uid:
                found.append(other)
    return found


def kill_container(uid: str, process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the container's main process and every process carrying its marker."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    for other in container_processes(uid, process):
        with contextlib.suppress(psutil.Error):
            other.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _job_finished(job: JsonDict) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in job.get("status", {}).get("conditions") or [])


def _ready_condition(old_status: JsonDict, ready: bool) -> list[JsonDict]:
    """The pod's conditions with Ready set as the kubelet does (no readiness probe: ready
    while running); others (DisruptionTarget) kept, the time moving only on a flip."""
    conditions = old_status.get("conditions") or []
    value = "True" if ready else "False"
    old = next((c for c in conditions if c["type"] == "Ready"), None)
    if old is None or old["status"] != value:
        old = {"type": "Ready", "status": value, "lastTransitionTime": now_stamp()}
    return [*(c for c in conditions if c["type"] != "Ready"), old]


def _completion_index(pod: JsonDict) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX, 0))


def _condition(type_: str, reason: str, message: str, status: str = "True") -> JsonDict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now_stamp()}


