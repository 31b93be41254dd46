"""Pod Security Standards, "restricted" profile, as a checker for pod specs.

Written from the Kubernetes Pod Security Standards (baseline + restricted controls, current
policy version) so the chart's pods and the operator's trainer pods can be checked without an
API server: ``violations(pod_spec, annotations)`` lists every control a pod spec breaks ("" in
none). ``pod_templates(manifest)`` finds the pod specs inside workload objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Manifest = dict[str, Any]

# Baseline: capabilities that may be added (restricted allows only NET_BIND_SERVICE).
BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                           "container_engine_t"})
# Restricted: the only volume sources allowed.
RESTRICTED_VOLUMES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                "persistentVolumeClaim", "projected", "secret"})
SECCOMP_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ALLOWED = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"

WORKLOAD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"), "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"), "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def pod_templates(manifest: Manifest) -> Iterator[tuple[str, Manifest, dict[str, str]]]:
    """(where, pod spec, pod annotations) of every pod a manifest runs."""
    kind = manifest.get("kind")
    name = f"{kind}/{manifest.get('metadata', {}).get('name')}"
    if kind == "Pod":
        yield name, manifest["spec"], manifest["metadata"].get("annotations") or {}
        return
    path = WORKLOAD_TEMPLATE_PATHS.get(str(kind))
    if path is None:
        return
    template: Manifest = manifest
    for key in path:
        template = template[key]
    yield name, template["spec"], (template.get("metadata") or {}).get("annotations") or {}


def _containers(spec: Manifest) -> list[Manifest]:
    return [*spec.get("initContainers", []), *spec.get("containers", []),
            *spec.get("ephemeralContainers", [])]


def violations(spec: Manifest, annotations: dict[str, str] | None = None) -> list[str]:
    """Every restricted-profile control the pod spec breaks, as readable messages."""
    out: list[str] = []
    pod_sc: Manifest = spec.get("securityContext") or {}
    containers = _containers(spec)

    # --- baseline -----------------------------------------------------------------------
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"host namespaces: {field}=true")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("hostProcess: pod securityContext.windowsOptions.hostProcess=true")
    for volume in spec.get("volumes", []):
        if "hostPath" in volume:
            out.append(f"hostPath volumes: volume {volume.get('name')!r}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctls: {sysctl.get('name')!r} is not a safe sysctl")
    for key, value in (annotations or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" \
                and not str(value).startswith("localhost/"):
            out.append(f"AppArmor: annotation {key}={value}")
    out += _profile_checks("pod", pod_sc)

    for container in containers:
        where = f"container {container.get('name')!r}"
        sc: Manifest = container.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"privileged: {where}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"hostProcess: {where}")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                out.append(f"hostPorts: {where} hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"/proc mount type: {where} procMount={sc['procMount']}")
        out += _profile_checks(where, sc)
        extra = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if extra:
            out.append(f"capabilities (baseline): {where} adds {sorted(extra)}")

    # --- restricted ---------------------------------------------------------------------
    for volume in spec.get("volumes", []):
        sources = set(volume) - {"name"}
        if not sources <= RESTRICTED_VOLUMES:
            out.append(f"volume types: volume {volume.get('name')!r} uses {sorted(sources)}")
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    if pod_sc.get("runAsUser") == 0:
        out.append("running as non-root user: pod runAsUser=0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for container in containers:
        where = f"container {container.get('name')!r}"
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"privilege escalation: {where} must set allowPrivilegeEscalation=false")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot") is True):
            out.append(f"running as non-root: {where} (runAsNonRoot=true on the pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"running as non-root user: {where} runAsUser=0")
        if pod_seccomp is None and (sc.get("seccompProfile") or {}).get("type") is None:
            out.append(f"seccomp: {where} (RuntimeDefault or Localhost on the pod or container)")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            out.append(f"capabilities: {where} must drop ALL")
        added = set(capabilities.get("add") or [])
        if added - RESTRICTED_CAPABILITIES:
            out.append(f"capabilities: {where} may only add NET_BIND_SERVICE, adds "
                       f"{sorted(added - RESTRICTED_CAPABILITIES)}")
    return out


def _profile_checks(where: str, sc: Manifest) -> list[str]:
    """Seccomp, AppArmor and SELinux fields, the same at pod and container level."""
    out = []
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in SECCOMP_ALLOWED:
        out.append(f"seccomp: {where} seccompProfile.type={seccomp}")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in APPARMOR_ALLOWED:
        out.append(f"AppArmor: {where} appArmorProfile.type={apparmor}")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        out.append(f"SELinux: {where} type={selinux['type']}")
    for field in ("user", "role"):
        if selinux.get(field):
            out.append(f"SELinux: {where} sets {field}")
    return out
