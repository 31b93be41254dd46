"""The local cluster of the e2e tests (docs/e2e.md): emulated API server with the CRD from
crds/, the real operator process, the pod runner (Job controller + kubelet), a moto S3 server,
and the real `kubectl` pointed at it all.

    with LocalCluster(tmp_path, s3_endpoint) as cluster:
        cluster.kubectl("apply", "-f", cluster.write_manifest(s3_example(...)))
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from support.cluster_api import cluster_emulator
from support.kube_emulator import EmulatorThread, JsonDict
from support.operator_process import FTJ, OperatorProcess, free_port, wait_for
from support.pod_runner import ROOT, PodRunner
from support.s3 import ACCESS_KEY, REGION, SECRET_KEY
from support.tools import tool_path

T = TypeVar("T")
NAMESPACE = "default"
STORAGE_SECRET = "s3-credentials"
CRD_FILE = ROOT / "crds" / "finetunejobs.kubetune.dev.yaml"
# Short, so a gang restart does not wait 5 minutes for a rank stuck in a dead collective.
TERMINATION_GRACE_SECONDS = 20
# A pod on a lost node is force-deleted this long after its grace period (default 60).
FORCE_DELETE_AFTER_SECONDS = 5


def kubectl_binary() -> str | None:
    return tool_path("kubectl")


def s3_example(example: str, *, name: str, bucket: str, endpoint: str, nodes: int = 1,
               **sections: dict[str, Any]) -> JsonDict:
    """examples/<example>.yaml as the e2e applies it: its own name, `nodes` nodes, output to
    s3://<bucket>/<name> through the endpoint with the credentials Secret, a free metrics port,
    and `sections` merged into the spec (e.g. training={"maxSteps": 40}). Relative data paths
    stay: the pod runner starts processes in the repository root, standing in for the image's
    working directory."""
    body: JsonDict = yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text())
    spec = body["spec"]
    body["metadata"] = {"name": name, "namespace": NAMESPACE}
    spec["resources"]["nodes"] = nodes
    spec["output"] = {"uri": f"s3://{bucket}/{name}"}
    spec["storage"] = {"secretName": STORAGE_SECRET, "endpointUrl": endpoint, "region": REGION}
    spec["metrics"] = {"port": free_port()}
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return body


def storage_secret() -> JsonDict:
    data = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": STORAGE_SECRET, "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class LocalCluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.api = EmulatorThread(cluster_emulator(CRD_FILE))
        self.operator: OperatorProcess | None = None
        self.runner: PodRunner | None = None
        self.kubeconfig = workdir / "kubeconfig"

    def __enter__(self) -> LocalCluster:
        self.api.__enter__()
        self.api.write_kubeconfig(self.kubeconfig, namespace=NAMESPACE, token="kubectl")
        self.operator = OperatorProcess(
            self.api, self.workdir, KUBETUNE_HEALTH_PORT=str(free_port()),
            KUBETUNE_TERMINATION_GRACE_SECONDS=str(TERMINATION_GRACE_SECONDS),
            KUBETUNE_FORCE_DELETE_AFTER_SECONDS=str(FORCE_DELETE_AFTER_SECONDS)).start()
        self.runner = PodRunner(self.api, self.workdir / "pods").__enter__()
        self.apply(storage_secret())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            self.runner.__exit__()
        if self.operator is not None:
            self.operator.stop()
        self.api.__exit__()

    # --- kubectl ---------------------------------------------------------------------------------

    def kubectl(self, *args: str) -> str:
        result = subprocess.run([kubectl_binary() or "kubectl", "--kubeconfig",
                                 str(self.kubeconfig), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def apply(self, manifest: JsonDict) -> str:
        """`kubectl apply -f` of `manifest` written to a file (no OpenAPI to validate against)."""
        path = self.workdir / f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        return self.kubectl("apply", "--validate=false", "-f", str(path))

    # --- observation -----------------------------------------------------------------------------

    def ftj(self, name: str) -> JsonDict:
        return self.api.get(FTJ, NAMESPACE, name) or {}

    def status(self, name: str) -> JsonDict:
        return copy.deepcopy(self.ftj(name).get("status", {}))

    def wait(self, probe: Callable[[], T | None], what: str, timeout: float) -> T:
        try:
            return wait_for(probe, timeout, interval=0.25, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None

    def wait_finished(self, name: str, timeout: float) -> JsonDict:
        """The status once the phase is Succeeded or Failed. `timeout` bounds a stall, not
        the run: it starts again whenever the job shows progress (its status or its pods'
        output changed), so a slow or busy machine makes the wait longer, never a failure."""
        assert self.runner is not None
        seen: tuple[str, int] | None = None
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(name)
            if status.get("phase") in ("Succeeded", "Failed"):
                return status
            now = (json.dumps(status, sort_keys=True), self.runner.output_size())
            if now != seen:
                seen, deadline = now, time.monotonic() + timeout
            elif time.monotonic() > deadline:
                raise AssertionError(f"{name} made no progress for {timeout}s; last status: "
                                     f"{status!r}\n{self.diagnostics()}")
            time.sleep(0.25)

    def diagnostics(self) -> str:
        assert self.operator is not None and self.runner is not None
        errors = "".join(f"runner error: {e!r}\n" for e in self.runner.errors)
        return (f"{errors}--- operator log ---\n{self.operator.logs()[-4000:]}\n"
                f"--- pod logs ---\n{self.runner.logs()}")
