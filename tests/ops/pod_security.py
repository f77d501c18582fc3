"""The Kubernetes Pod Security Standards' "restricted" profile, checked on a pod spec (no cluster needed).

Written from the standard (kubernetes.io/docs/concepts/security/pod-security-standards, policy version
latest): the "restricted" profile is every "baseline" control plus the restricted ones. Each returned
violation names the control and the field, like the admission controller's warnings. No PyPI package
implements these checks offline, so they live here, one function per control.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
        "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
        "image",
    }
)
SECCOMP_RESTRICTED = frozenset({"RuntimeDefault", "Localhost"})


def _containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(kind) or []:
            yield f"{kind}[{container.get('name')}]", container


def _baseline(pod: dict[str, Any]) -> Iterator[str]:
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            yield f"host namespaces: spec.{field}=true"
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        yield "hostProcess: spec.securityContext.windowsOptions.hostProcess=true"
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            yield f"hostPath volumes: volume {volume.get('name')}"
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"sysctls: {sysctl.get('name')}"
    yield from _selinux("spec.securityContext", psc)
    yield from _apparmor("spec.securityContext", psc)
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield "seccomp: spec.securityContext.seccompProfile.type=Unconfined"
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            yield f"privileged: {where}.securityContext.privileged=true"
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            yield f"hostProcess: {where}"
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            yield f"capabilities: {where} adds {sorted(added - BASELINE_CAPABILITIES)}"
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                yield f"hostPorts: {where} hostPort {port['hostPort']}"
        yield from _selinux(f"{where}.securityContext", sc)
        yield from _apparmor(f"{where}.securityContext", sc)
        if sc.get("procMount", "Default") != "Default":
            yield f"/proc mount type: {where}.securityContext.procMount={sc['procMount']}"
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            yield f"seccomp: {where}.securityContext.seccompProfile.type=Unconfined"


def _selinux(where: str, sc: dict[str, Any]) -> Iterator[str]:
    options = sc.get("seLinuxOptions") or {}
    if options.get("type", "") not in SELINUX_TYPES:
        yield f"SELinux: {where}.seLinuxOptions.type={options['type']}"
    for field in ("user", "role"):
        if options.get(field):
            yield f"SELinux: {where}.seLinuxOptions.{field} set"


def _apparmor(where: str, sc: dict[str, Any]) -> Iterator[str]:
    profile = (sc.get("appArmorProfile") or {}).get("type")
    if profile not in (None, "RuntimeDefault", "Localhost"):
        yield f"AppArmor: {where}.appArmorProfile.type={profile}"


def _restricted(pod: dict[str, Any]) -> Iterator[str]:
    psc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            yield f"volume types: volume {volume.get('name')} is {sorted(kinds - RESTRICTED_VOLUME_TYPES)}"
    if psc.get("runAsUser") == 0:
        yield "running as non-root user: spec.securityContext.runAsUser=0"
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"privilege escalation: {where}.securityContext.allowPrivilegeEscalation must be false"
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            yield f"running as non-root: {where} runAsNonRoot must be true (pod or container)"
        if sc.get("runAsUser") == 0:
            yield f"running as non-root user: {where}.securityContext.runAsUser=0"
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_RESTRICTED:
            yield f"seccomp: {where} needs seccompProfile RuntimeDefault or Localhost (pod or container)"
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"capabilities: {where} must drop ALL"
        added = set(capabilities.get("add") or [])
        if added - {"NET_BIND_SERVICE"}:
            yield f"capabilities: {where} may add only NET_BIND_SERVICE, adds {sorted(added)}"


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every "restricted" (incl. "baseline") control that the pod spec ``pod`` fails; [] when it passes."""
    return [*_baseline(pod), *_restricted(pod)]
