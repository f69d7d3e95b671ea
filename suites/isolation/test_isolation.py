"""The VM boundary holds: what a workload sees is the candidate's guest, never the host.

Each check runs from an unprivileged workload and, where it matters, from a privileged one (which stands for
a compromised guest). With ``--kata-runtime runc`` (the negative control) this suite must fail, and say why:
runc is no VM, the workload runs on the host kernel.
"""

from __future__ import annotations

import pytest

from pytest_kata.runid import current_run_id
from pytest_kata.sandbox import SandboxError, Workload, checks

pytestmark = pytest.mark.vm  # every check probes a running sandbox (qemu or containerd)

WORKLOADS = [pytest.param(False, id="unprivileged"), pytest.param(True, id="privileged")]


def handler_of(sandbox) -> str:
    return getattr(sandbox, "handler", sandbox.name)


@pytest.mark.kata_check("KATA-ISO-001", severity="critical", title="the workload runs the candidate's guest kernel")
def test_kernel_is_the_guest_kernel(kata_sandbox, kata_probe, kata_host_facts, kata_result):
    """uname -r is the candidate's guest kernel and the boot id is not the host's."""
    facts = kata_probe(privileged=False)
    kata_result.record(sandbox=kata_sandbox.describe())
    if hasattr(kata_sandbox, "console_log"):
        kata_result.attach("guest console", kata_sandbox.console_log())
    checks.kernel_identity(facts, kata_host_facts, expected=kata_sandbox.guest_kernel_release(),
                           is_vm=kata_sandbox.is_vm, handler=handler_of(kata_sandbox)).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-002", severity="high", title="host processes are invisible")
@pytest.mark.parametrize("privileged", WORKLOADS)
def test_host_processes_invisible(privileged, kata_probe, kata_host_facts, kata_result):
    facts = kata_probe(privileged=privileged)
    checks.host_processes(facts, kata_host_facts["process_comms"]).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-003", severity="high", title="host mounts are invisible")
@pytest.mark.parametrize("privileged", WORKLOADS)
def test_host_mounts_invisible(privileged, kata_probe, kata_host_facts, kata_result):
    from pytest_kata.plugins.sandbox import sandbox_dirs

    facts = kata_probe(privileged=privileged)
    checks.host_mounts(facts, kata_host_facts["mounts"], sandbox_dirs()).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-004", severity="medium", title="the host's hostname is not the workload's")
def test_hostname_is_not_the_hosts(kata_sandbox, kata_probe, kata_host_facts, kata_result):
    facts = kata_probe(privileged=False)
    checks.hostname(facts, kata_host_facts, is_vm=kata_sandbox.is_vm, handler=handler_of(kata_sandbox)) \
        .apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-005", severity="high", title="host files are invisible")
@pytest.mark.parametrize("privileged", WORKLOADS)
def test_host_marker_invisible(privileged, kata_probe, kata_result):
    checks.host_markers(kata_probe(privileged=privileged)).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-006", severity="high", title="host devices are invisible")
@pytest.mark.parametrize("privileged", WORKLOADS)
def test_host_devices_invisible(privileged, kata_probe, kata_host_facts, kata_result):
    facts = kata_probe(privileged=privileged)
    checks.host_devices(facts, kata_host_facts["block_devices"], kata_host_facts["dev_nodes"]).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-007", severity="high", title="the run's test networks and host addresses are "
                        "unreachable")
def test_networks_unreachable(kata_probe, kata_probe_targets, kata_host_facts, kata_result):
    targets = kata_probe_targets["targets"]
    kata_result.record(test_network=kata_probe_targets)
    if targets and not kata_probe_targets.get("witness_reached"):
        kata_result.conclude("error", "the test network's listener is not reachable even from a peer on the same "
                             "bridge: the check would prove nothing")
    facts = kata_probe(privileged=True, targets=tuple(targets))
    checks.network(facts, targets, kata_host_facts["addresses"]).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-008", severity="critical", title="the agent's channel (vsock ports 1024/1026, "
                        "or its virtio-serial port without vsock) is not reachable from the workload")
@pytest.mark.parametrize("privileged", WORKLOADS)
def test_vsock_ports_closed(privileged, kata_probe, kata_result):
    checks.vsock_ports(kata_probe(privileged=privileged)).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-009", severity="medium", title="memory is bounded by the sandbox size")
def test_memory_bounded(kata_sandbox, kata_probe, kata_host_facts, kata_sandbox_config, kata_result):
    limit = getattr(getattr(kata_sandbox, "spec", None), "memory_mb", None)
    if limit is None and kata_sandbox_config is not None:
        limit = kata_sandbox_config.get("hypervisor.*.default_memory", None)
    checks.memory_bounded(kata_probe(privileged=False), kata_host_facts, limit_mb=limit,
                          is_vm=kata_sandbox.is_vm, handler=handler_of(kata_sandbox)).apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-010", severity="high", title="an unprivileged workload has no admin "
                        "capabilities and cannot write kernel knobs")
def test_unprivileged_boundary(kata_sandbox, kata_probe, kata_result):
    facts = kata_probe(privileged=False)
    checks.container_boundary(facts, has_container=kata_sandbox.name != "direct").apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-011", severity="critical", title="host state is unchanged after a hostile "
                        "privileged workload")
def test_host_unchanged_after_hostile_workload(kata_sandbox, kata_probe, kata_host_baseline, kata_result):
    """A privileged workload writes core_pattern, uevent_helper and its root device; the host must not notice."""
    facts = kata_probe(privileged=True, writes=True)
    kata_result.record(writes=facts.get("writes"), writes_refused=facts.get("writes_refused"),
                       host_view=kata_sandbox.host_view().to_json())
    outcome = checks.host_unchanged(kata_host_baseline.diff(), what="a privileged workload's writes")
    if outcome.status == "pass" and not kata_sandbox.is_vm:
        outcome = checks.Outcome("fail", f"{handler_of(kata_sandbox)} is no VM: the workload runs on the host "
                                 "kernel, so a privileged workload's writes would land on the host (not attempted)",
                                 outcome.evidence)
    outcome.apply(kata_result)


@pytest.mark.kata_check("KATA-ISO-012", severity="high", title="the device cgroup denies a CAP_MKNOD workload the "
                        "guest's root block device")
def test_device_cgroup_denies_the_root_device(kata_sandbox, kata_probe, kata_host_facts, kata_result):
    """An unprivileged container keeps CAP_MKNOD by default: it makes a node for the guest's root device and
    opens it, which the device cgroup must refuse (skipped when the guest has no root device)."""
    if kata_sandbox.name == "direct":
        kata_result.conclude("notapplicable", "the direct driver runs no container, so there is no device cgroup")
    checks.device_cgroup_root(kata_probe(privileged=False), kata_host_facts["block_devices"],
                              is_vm=kata_sandbox.is_vm, handler=handler_of(kata_sandbox)).apply(kata_result)


CPU_QUOTA = 0.5  # CPUs
CPU_BURN_SECONDS = 6


@pytest.mark.kata_check("KATA-ISO-013", severity="medium", title="a CPU quota holds: the workload cannot use more "
                        "CPU than it")
def test_cpu_quota_holds(kata_sandbox, kata_result):
    """Two busy loops in a container with a quota of half a CPU, measured from inside over a few seconds."""
    if kata_sandbox.name == "direct":
        kata_result.conclude("notapplicable", "the direct driver runs no container to give a CPU quota")
    try:
        facts = kata_sandbox.probe(Workload(cpus=CPU_QUOTA, cpu_burn=CPU_BURN_SECONDS, mark=current_run_id()))
    except SandboxError as exc:
        kata_result.conclude("error", f"the probe with a CPU quota of {CPU_QUOTA:g} did not run: {exc}")
    checks.cpu_limited(facts, quota_cpus=CPU_QUOTA, handler=handler_of(kata_sandbox)).apply(kata_result)


MEMORY_LIMIT_MB = 64
MEMORY_ASKED_MB = 192


@pytest.mark.kata_check("KATA-ISO-014", severity="medium", title="a memory limit holds: a process cannot hold more "
                        "memory than its container's limit")
def test_memory_limit_holds(kata_sandbox, kata_result):
    """A process asks for three times its container's memory limit; it must be OOM-killed below the limit. A
    runtime that refuses to start a pod with a memory limit (e.g. its memory hot-plug fails) leaves nothing to
    observe: skipped with its error, never pass."""
    if kata_sandbox.name == "direct":
        kata_result.conclude("notapplicable", "the direct driver runs no container to give a memory limit")
    try:
        facts = kata_sandbox.probe(Workload(memory_mb=MEMORY_LIMIT_MB, mem_fill_mb=MEMORY_ASKED_MB,
                                            mark=current_run_id()))
    except SandboxError as exc:
        kata_result.conclude("skipped", f"cannot observe: the runtime refused to start a pod with a "
                             f"{MEMORY_LIMIT_MB} MiB memory limit: {exc}")
    checks.memory_limited(facts, limit_mb=MEMORY_LIMIT_MB, handler=handler_of(kata_sandbox)).apply(kata_result)
