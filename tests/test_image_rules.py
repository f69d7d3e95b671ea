"""Image facts and the KATA-IMG rules: a baseline-like guest (systemd, bash, apt, sshd, setuid, writable root)
fails for concrete reasons, a minimal hardened one passes; every rule's own bad/good data is caught/accepted.
The trees are real files in real ext4 images read back with debugfs."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_kata.images.common import make_ext4_disk, make_initrd
from pytest_kata.images.facts import image_facts
from pytest_kata.images.read import open_image
from pytest_kata.images.surface import measure, over_budget, table
from pytest_kata.rules import Facts, evaluate, judge, load_profile, load_rules
from pytest_kata.rules.subjects import image_subjects

CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")
HARDENING_SYSCTLS = """kernel.kptr_restrict = 2
kernel.dmesg_restrict = 1
kernel.unprivileged_bpf_disabled = 1
net.core.bpf_jit_harden = 2
kernel.yama.ptrace_scope = 2
kernel.kexec_load_disabled = 1
fs.protected_symlinks = 1
fs.protected_hardlinks = 1
fs.protected_fifos = 2
fs.protected_regular = 2
fs.suid_dumpable = 0
kernel.randomize_va_space = 2
kernel.modules_disabled = 1
kernel.sysrq = 0
vm.unprivileged_userfaultfd = 0
dev.tty.ldisc_autoload = 0
kernel.perf_event_paranoid = 3
"""


def _exe(root: Path, rel: str, src: str = "/bin/true", mode: int = 0o755) -> None:
    dst = root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    os.chmod(dst, mode)


def _base_layout(root: Path) -> None:
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc/systemd/system", "var/lib/dpkg", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        os.symlink(target, root / link)
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n')
    (root / "var/lib/dpkg/status").write_text("")


def baseline_tree(root: Path) -> Path:
    """What many users run: a Debian guest with systemd, bash, apt, sshd, setuid tools, getty."""
    _base_layout(root)
    _exe(root, "usr/lib/systemd/systemd")
    _exe(root, "usr/lib/systemd/systemd-sysctl")
    os.symlink("/lib/systemd/systemd", root / "usr/sbin/init")
    for tool in ("bash", "dash", "apt", "dpkg", "gdb", "curl"):
        _exe(root, f"usr/bin/{tool}", f"/bin/{tool}" if tool in ("bash", "dash") else "/bin/true")
    _exe(root, "usr/bin/busybox", "/bin/busybox")  # Debian guests often carry it too (initramfs-tools)
    os.symlink("dash", root / "usr/bin/sh")
    _exe(root, "usr/sbin/sshd")
    _exe(root, "usr/bin/su", mode=0o4755)
    _exe(root, "usr/bin/ping")
    os.setxattr(root / "usr/bin/ping", "security.capability", CAP_NET_RAW_EP)
    _exe(root, "usr/bin/kata-agent")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    for unit in ("kata-agent.service", "ssh.service", "cron.service"):
        os.symlink(f"/lib/systemd/system/{unit}", wants / unit)
    (root / "etc/systemd/system/getty.target.wants").mkdir()
    os.symlink("/lib/systemd/system/getty@.service", root / "etc/systemd/system/getty.target.wants/getty@tty1.service")
    (root / "etc/fstab").write_text("UUID=abc / ext4 defaults,errors=remount-ro 0 1\n")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\ntoor:x:0:0::/root:/bin/sh\n")
    (root / "etc/shadow").write_text("root::19000:0:99999:7:::\ntoor:*:19000:0:99999:7:::\n")
    (root / "etc/kata-hooks").mkdir()
    os.chmod(root / "etc/kata-hooks", 0o777)
    return root


def minimal_tree(root: Path) -> Path:
    """The hardened shape: agent as init (it applies the sysctls), busybox sh only, nothing else."""
    _base_layout(root)
    _exe(root, "usr/bin/busybox", "/bin/busybox")
    os.symlink("busybox", root / "usr/bin/sh")
    agent = root / "usr/bin/kata-agent"
    agent.write_text("#!/bin/sh\n# placeholder agent\nsysctl -q -p /etc/sysctl.d/90-kata-hardening.conf\n"
                     "exec /bin/sh\n")
    os.chmod(agent, 0o755)
    os.symlink("/usr/bin/kata-agent", root / "usr/sbin/init")
    (root / "etc/sysctl.d").mkdir()
    (root / "etc/sysctl.d/90-kata-hardening.conf").write_text(HARDENING_SYSCTLS)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/sbin/nologin\n")
    (root / "etc/shadow").write_text("root:!:19000:0:99999:7:::\n")
    return root


CMDLINE = "rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4 console=hvc0"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("img")
    out = {}
    for name, build in (("baseline", baseline_tree), ("minimal", minimal_tree)):
        tree = build(base / name)
        make_ext4_disk(tree, base / f"{name}.img")
        out[name] = base / f"{name}.img"
    return out


def judge_all(path: Path, cmdline: str | None = CMDLINE, context: dict[str, Any] | None = None,
              profile: str = "default") -> dict[str, Any]:
    """Every image rule judged as the suite does (profile tags and severities applied)."""
    with open_image(path) as root:
        facts = image_facts(root, cmdline=cmdline)
        ctx = {"image_kind": root.kind, "confidential": False, **(context or {})}
    prof = load_profile(profile)
    return {rule.id: judge(rule, facts, ctx, profile=prof).outcome for rule in load_rules("image")}


def _facts(path: Path, cmdline: str | None = CMDLINE) -> Any:
    with open_image(path) as root:
        return image_facts(root, cmdline=cmdline)


def test_baseline_fails_for_concrete_reasons(images: dict[str, Path]) -> None:
    outcomes = judge_all(images["baseline"])
    failed = {rid for rid, o in outcomes.items() if o.status == "fail"}
    expected_failures = {
        "KATA-IMG-001": "/usr/bin/su", "KATA-IMG-002": "cap_net_raw", "KATA-IMG-003": "/etc/kata-hooks",
        "KATA-IMG-004": "toor", "KATA-IMG-005": "root", "KATA-IMG-006": "/usr/bin/dash", "KATA-IMG-007": "/usr/bin/apt",
        "KATA-IMG-008": "/usr/sbin/sshd", "KATA-IMG-009": "/usr/bin/gdb", "KATA-IMG-010": "ssh.service",
        "KATA-IMG-011": "systemd", "KATA-IMG-012": "False", "KATA-IMG-016": "not set",
    }
    for rid, evidence in expected_failures.items():
        assert rid in failed, f"{rid} should fail on the baseline: {outcomes[rid]}"
        assert evidence in str(outcomes[rid].actual) + outcomes[rid].message, (rid, outcomes[rid])
    assert outcomes["KATA-IMG-013"].status == "notapplicable"  # not confidential
    assert outcomes["KATA-IMG-026"].status == "pass"


def test_minimal_passes_every_rule(images: dict[str, Path]) -> None:
    outcomes = judge_all(images["minimal"])
    bad = {rid: o.message for rid, o in outcomes.items() if o.status not in ("pass", "notapplicable")}
    assert not bad
    assert outcomes["KATA-IMG-013"].status == "notapplicable"


def test_facts_tell_what_runs(images: dict[str, Path]) -> None:
    with open_image(images["baseline"]) as root:
        f = image_facts(root, cmdline=CMDLINE)
    assert f["init.kind"] == "systemd"
    assert f["sysctl.applied_by"] == "systemd-sysctl"
    assert "systemd-remount-fs" in f["root.readonly_reason"]
    assert set(f["services.enabled"]) == {"kata-agent.service", "ssh.service", "cron.service", "getty@tty1.service"}
    with open_image(images["minimal"]) as root:
        f = image_facts(root, cmdline=CMDLINE + " agent.debug_console mitigations=off")
    assert f["init.kind"] == "kata-agent" and f["sysctl.kernel.kptr_restrict"] == 2
    assert f["cmdline.debug"] == ["agent.debug_console"] and f["cmdline.weakeners"] == ["mitigations=off"]
    assert f["root.readonly"] is True and "command line" in f["root.readonly_reason"]


def test_sysctl_files_nobody_applies_do_not_count(tmp_path: Path) -> None:
    """Agent-as-init guests apply no sysctl.d: a file there alone must not pass the sysctl rules."""
    tree = minimal_tree(tmp_path / "t")
    (tree / "usr/bin/kata-agent").write_text("#!/bin/sh\nexec /bin/sh\n")
    with open_image(tree) as root:
        f = image_facts(root)
    assert "sysctl.kernel.kptr_restrict" not in f and f["sysctl.unapplied"]
    assert any("nothing in the guest applies" in n for n in f.notes)
    rule = next(r for r in load_rules("image") if r.id == "KATA-IMG-016")
    assert evaluate(rule, f, {}).status == "fail"
    with open_image(tree) as root:  # the kernel applies sysctl.* parameters itself
        f = image_facts(root, cmdline="ro sysctl.kernel.kptr_restrict=2")
    assert evaluate(rule, f, {}).status == "pass"


def test_cmdline_rw_and_debug_console(images: dict[str, Path]) -> None:
    outcomes = judge_all(images["minimal"], cmdline="rw agent.debug_console")
    assert outcomes["KATA-IMG-012"].status == "fail"
    assert outcomes["KATA-IMG-015"].status == "fail"
    assert judge_all(images["minimal"], cmdline=None)["KATA-IMG-015"].status == "notapplicable"


def test_dm_verity_rule_runs_when_the_profile_asks_for_measured_boot(images: dict[str, Path]) -> None:
    assert judge_all(images["minimal"])["KATA-IMG-013"].status == "notapplicable"
    assert judge_all(images["minimal"], profile="confidential")["KATA-IMG-013"].status == "fail"
    with open_image(images["minimal"]) as root:
        f = image_facts(root, cmdline=CMDLINE, verity_params="root_hash=ab,salt=cd")
    rule = next(r for r in load_rules("image") if r.id == "KATA-IMG-013")
    verdict = judge(rule, f, {"image_kind": "ext4"}, profile=load_profile("confidential"))
    assert verdict.status == "pass"


def test_initrd_root_rule_not_applicable(tmp_path: Path) -> None:
    tree = minimal_tree(tmp_path / "t")
    os.symlink("/usr/bin/kata-agent", tree / "init")
    make_initrd(tree, tmp_path / "i.gz")
    outcomes = judge_all(tmp_path / "i.gz", cmdline="")
    assert outcomes["KATA-IMG-012"].status == "notapplicable"
    assert outcomes["KATA-IMG-011"].status == "pass"


@pytest.mark.parametrize("rule", load_rules("image"), ids=lambda r: r.id)
def test_rule_mutation_data(rule: Any) -> None:
    """Each rule carries bad/good fact sets: the bad one must fail, the good one pass (rules can fail)."""
    assert rule.test.get("bad") and rule.test.get("good"), f"{rule.id} lacks [rule.test] bad/good"
    ctx = {"image_kind": "ext4", "confidential": True}
    assert evaluate(rule, Facts(dict(rule.test["bad"])), ctx).status == "fail"
    assert evaluate(rule, Facts(dict(rule.test["good"])), ctx).status == "pass"


def test_surface_table_and_budget(images: dict[str, Path]) -> None:
    base, mini = measure(images["baseline"], "baseline"), measure(images["minimal"], "minimal")
    text = table(base, mini)
    assert "setuid/setgid files" in text and "enabled services" in text
    assert base.metrics["setuid"] == 1 and mini.metrics["setuid"] == 0
    assert base.metrics["services"] == 4 and mini.metrics["services"] == 0
    assert over_budget(base, mini, 10.0) == []  # shrinking is fine
    grown = over_budget(mini, base, 10.0)  # the other way round: many metrics over budget
    assert any(line.startswith("setuid/setgid files: 0 -> 1 (from 0") for line in grown)
    assert any(line.startswith("executables:") for line in grown)


def test_suite_picks_configured_image(images: dict[str, Path], tmp_path: Path) -> None:
    """The suite judges the image the shim's configuration boots, with the cmdline Kata would build."""
    root = tmp_path / "opt-kata"
    (root / "share/kata-containers").mkdir(parents=True)
    shutil.copy(images["baseline"], root / "share/kata-containers/kata-baseline.img")
    shutil.copy(images["minimal"], root / "share/kata-containers/kata-minimal.img")
    config = SimpleNamespace(confidential=False, get=lambda key, default=None: {
        "hypervisor.*.image": "/opt/kata/share/kata-containers/kata-minimal.img",
        "hypervisor.*.kernel_params": "agent.log=debug", "agent.kata.debug_console_enabled": True,
    }.get(key, default))
    bundle = SimpleNamespace(path=lambda rel: root / rel, shim=lambda name=None: SimpleNamespace(config=config),
                             images=["share/kata-containers/kata-baseline.img",
                                     "share/kata-containers/kata-minimal.img"], initrds=[])
    chosen = image_subjects(bundle, None)  # type: ignore[arg-type]
    assert [c.rel for c in chosen] == ["share/kata-containers/kata-minimal.img"]
    assert chosen[0].image_facts["cmdline.debug"] == ["agent.log=debug", "agent.debug_console",
                                                      "agent.debug_console_vport=1026"]


def test_images_compare_cli(images: dict[str, Path]) -> None:
    """`pytest-kata images compare A B` on image files; --budget gates growth (exit 1) and passes shrinkage."""
    import subprocess

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest_kata.cli", "images", "compare", *args],
                              capture_output=True, text=True, env={**os.environ, "PYTEST_KATA_QUIET": "1"},
                              check=False, timeout=120)

    shrink = run(str(images["baseline"]), str(images["minimal"]), "--budget", "10")
    assert shrink.returncode == 0, shrink.stderr
    assert "setuid/setgid files" in shrink.stdout and "-4 (-100.0%)" in shrink.stdout  # services 4 -> 0
    grow = run(str(images["minimal"]), str(images["baseline"]), "--budget", "10")
    assert grow.returncode == 1 and "over budget: setuid/setgid files: 0 -> 1" in grow.stdout
    missing = run(str(images["minimal"]) + ".nope", str(images["baseline"]))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


@pytest.mark.slow
def test_real_guest_recipes() -> None:
    """D's recipes built with mmdebstrap (cached by content hash): the baseline fails the image rules for
    concrete reasons, the minimal image passes them all, and the surface table shows the difference."""
    from pytest_kata.images.guest import build_guest

    base, mini = build_guest("baseline"), build_guest("minimal")
    outcomes = judge_all(base.image)
    failed = {rid for rid, o in outcomes.items() if o.status == "fail"}
    assert {"KATA-IMG-001", "KATA-IMG-007", "KATA-IMG-008", "KATA-IMG-010", "KATA-IMG-011", "KATA-IMG-012",
            "KATA-IMG-016"} <= failed
    assert "/usr/bin/su" in outcomes["KATA-IMG-001"].actual
    assert "getty@tty1.service" in outcomes["KATA-IMG-010"].actual
    assert any(re.fullmatch(r"getty@tty1\.service: (/usr)?/lib/systemd/system/getty@\.service \(enabled by "
                            r"/etc/systemd/system/getty\.target\.wants/getty@tty1\.service\)", unit)
               for unit in _facts(base.image).about(["services.enabled"])["services.units"])
    for artefact in (mini.image, mini.initrd):
        bad = {rid: o.message for rid, o in judge_all(artefact).items() if o.status not in ("pass", "notapplicable")}
        assert not bad, f"{artefact}: {bad}"
    b, m = measure(base.image, "baseline"), measure(mini.image, "minimal")
    assert m.metrics["packages"] < b.metrics["packages"] and m.metrics["executables"] < b.metrics["executables"]
    assert b.metrics["setuid"] > 0 == m.metrics["setuid"]
    assert over_budget(b, m, 0.0) == [] and over_budget(m, b, 10.0)


def _bundle_with(image: Path, root: Path) -> Path:
    """A minimal /opt/kata tree: the real upstream qemu configuration pointing at ``image``."""
    kata = root / "opt/kata"
    (kata / "share/kata-containers").mkdir(parents=True)
    (kata / "share/defaults/kata-containers").mkdir(parents=True)
    shutil.copy(image, kata / "share/kata-containers/kata-test.img")
    os.symlink("kata-test.img", kata / "share/kata-containers/kata-containers.img")
    configs = Path(__file__).resolve().parents[1] / "fixtures/configs/hardened/configuration-qemu.toml"
    shutil.copy(configs, kata / "share/defaults/kata-containers/configuration-qemu.toml")
    os.symlink("configuration-qemu.toml", kata / "share/defaults/kata-containers/configuration.toml")
    (kata / "VERSION").write_text("4.1.0\n")
    return root


def _run_suite(*args: str, cwd: Path) -> dict[str, str]:
    import subprocess

    from pytest_kata.resources import suites_dir

    report = cwd / "verdict.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(suites_dir() / "hardening" / "test_guest_image.py"),
                           "-p", "no:cacheprovider", "-q", "--kata-report", str(report), *args],
                          cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTEST_KATA_QUIET": "1"},
                          check=False, timeout=300)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-2000:]
    data = json.loads(report.read_text())
    return {r["id"]: r["status"] for r in data["results"]}


@pytest.mark.slow
def test_suite_catches_baseline_and_passes_minimal(images: dict[str, Path], tmp_path: Path) -> None:
    """The shipped suite, run as a user runs it, on bundles holding the synthetic baseline / minimal images;
    with the minimal image as candidate and the baseline as --kata-baseline, the surface budget passes, and
    the other way round it fails."""
    bad = _bundle_with(images["baseline"], tmp_path / "bad")
    good = _bundle_with(images["minimal"], tmp_path / "good")
    bad_results = _run_suite("--kata-candidate", str(bad), "--kata-shim", "qemu", cwd=tmp_path)
    assert {k: bad_results[k] for k in ("KATA-IMG-001", "KATA-IMG-008", "KATA-IMG-011", "KATA-IMG-012")} == \
        dict.fromkeys(("KATA-IMG-001", "KATA-IMG-008", "KATA-IMG-011", "KATA-IMG-012"), "fail")
    good_results = _run_suite("--kata-candidate", str(good), "--kata-baseline", str(bad), "--kata-shim", "qemu",
                              cwd=tmp_path)
    not_ok = {k: v for k, v in good_results.items() if v not in ("pass", "notapplicable")}
    assert not_ok == {"KATA-IMG-101": "skipped"}  # these bundles ship no kernel: no guest boots
    assert good_results["KATA-IMG-100"] == "pass"
    grown = _run_suite("--kata-candidate", str(bad), "--kata-baseline", str(good), "--kata-shim", "qemu",
                       "-k", "surface", cwd=tmp_path)
    assert grown == {"KATA-IMG-100": "fail"}
    waivers = tmp_path / "waivers.toml"
    waivers.write_text('[[waiver]]\nrule = "KATA-IMG-001"\njustification = "su kept for a debugging image"\n'
                       'expires = 2099-01-01\nscope = ["kata-containers.img"]\n')
    waived = _run_suite("--kata-candidate", str(bad), "--kata-shim", "qemu", "--kata-waivers", str(waivers),
                        "-k", "KATA-IMG-001 or KATA-IMG-004", cwd=tmp_path)
    assert waived == {"KATA-IMG-001": "waived", "KATA-IMG-004": "fail"}


def test_parse_proc_net_against_ss() -> None:
    """The /proc/net parser on this machine's real socket tables agrees with `ss -ltnu` (same kernel view)."""
    import subprocess

    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) not installed")
    from pytest_kata.images.surface import PROC_NET, parse_proc_net

    counts = []
    for _ in range(3):  # other processes on this machine may open/close sockets in between: retry
        texts = {p: Path(f"/proc/net/{p}").read_text() for p in PROC_NET if Path(f"/proc/net/{p}").exists()}
        ours = parse_proc_net(texts)
        ss = subprocess.run(["ss", "-H", "-ltnu"], capture_output=True, text=True, check=True).stdout
        counts.append((len(ours), len([line for line in ss.splitlines() if line.strip()])))
        if counts[-1][0] == counts[-1][1]:
            break
    assert counts[-1][0] == counts[-1][1], counts
    assert parse_proc_net({"tcp": "  sl  local_address rem_address   st\n"
                                  "   0: 00000000:0016 00000000:0000 0A 0\n"
                                  "   1: 0100007F:1F90 0100007F:A000 01 0\n"}) == ["tcp:22"]


def test_images_compare_on_kata_trees(images: dict[str, Path], tmp_path: Path) -> None:
    """`images compare OLD_TREE NEW_TREE` measures the image each tree ships."""
    import subprocess

    bad = _bundle_with(images["baseline"], tmp_path / "bad")
    good = _bundle_with(images["minimal"], tmp_path / "good")
    proc = subprocess.run([sys.executable, "-m", "pytest_kata.cli", "images", "compare", str(good), str(bad),
                           "--budget", "5"], capture_output=True, text=True, check=False, timeout=120,
                          env={**os.environ, "PYTEST_KATA_QUIET": "1"})
    assert proc.returncode == 1 and "good:kata-test.img" in proc.stdout and "over budget" in proc.stdout


@pytest.mark.slow
def test_booted_surface_of_the_reference_candidate() -> None:
    """The dynamic half: boot the reference candidate's guest (direct driver, TCG here) once; its agent-init
    image listens on nothing, and the boot time is measured."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from reference import ensure_reference  # type: ignore[import-not-found]

    from pytest_kata.images.surface import measure_booted

    seconds, sockets = measure_booted(ensure_reference("candidate", "hardened"), "qemu")
    assert seconds > 0 and sockets == []


# ---- read-only root judged from how the candidate attaches its image ------------------------------------


UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "upstream"


def readonly_root(images: dict[str, Path], config: Any) -> tuple[Any, str]:
    from pytest_kata.images.facts import root_attachment

    attachment = root_attachment(config)
    with open_image(images["minimal"]) as root:
        f = image_facts(root, cmdline=attachment.cmdline(config), attachment=attachment)
    rule = next(r for r in load_rules("image") if r.id == "KATA-IMG-012")
    return evaluate(rule, f, {"image_kind": "ext4"}).status, f["root.readonly_reason"]


def test_read_only_root_follows_the_real_configurations_image_attachment(images: dict[str, Path]) -> None:
    """KATA-IMG-012 from the candidate's own attachment (disable_image_nvdimm, vm_rootfs_driver, kernel_params),
    not from a command line the harness prefixes with `ro`."""
    from pytest_kata.kataconfig import load_config

    qemu = load_config(UPSTREAM / "configuration-qemu.toml")  # NVDIMM, attached read-only by the runtime
    status, why = readonly_root(images, qemu)
    assert status == "pass" and "nvdimm" in why and "root=/dev/pmem0p1" in root_cmdline(qemu)
    clh = load_config(UPSTREAM / "configuration-clh.toml")  # disable_image_nvdimm = true: a read-only disk
    status, why = readonly_root(images, clh)
    assert status == "pass" and "virtio-blk" in why and "root=/dev/vda1" in root_cmdline(clh)
    pmem = clh.with_changes({"hypervisor.clh.disable_image_nvdimm": False})  # GHSA-wwj6: writable virtio-pmem
    status, why = readonly_root(images, pmem)
    assert status == "fail" and "GHSA-wwj6" in why
    rw = qemu.with_changes({"hypervisor.qemu.kernel_params": "rw"})  # kernel_params come after the root ones
    status, why = readonly_root(images, rw)
    assert status == "fail" and "rw" in why
    arm = qemu.with_changes({"hypervisor.qemu.machine_type": "virt"})  # arm64 QEMU: NVDIMM cannot be read-only
    assert readonly_root(images, arm)[0] == "fail"
    rs = load_config(UPSTREAM / "runtime-rs" / "configuration-qemu-runtime-rs.toml")
    assert "root=/dev/pmem0p1" in root_cmdline(rs) and "vm_rootfs_driver virtio-pmem" in readonly_root(images, rs)[1]


def root_cmdline(config: Any) -> str:
    from pytest_kata.images.facts import root_attachment

    return root_attachment(config).cmdline(config)


# ---- sysctl.d applied at boot: decided from what the init runs ------------------------------------------


def init_tree(root: Path, init: str, extra: dict[str, str] | None = None) -> Path:
    """The minimal guest with its init (/sbin/init) replaced by ``init`` (and other files)."""
    minimal_tree(root)
    _exe(root, "usr/bin/kata-agent")  # an ELF, like the real agent: it applies no sysctl file
    (root / "usr/sbin/init").unlink()
    script = root / "usr/sbin/init"
    script.write_text(init)
    os.chmod(script, 0o755)
    for rel, text in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


SYSCTL_RULE_IDS = ("KATA-IMG-016", "KATA-IMG-017", "KATA-IMG-020", "KATA-IMG-027")


def sysctl_outcomes(tree: Path) -> tuple[Any, dict[str, Any]]:
    with open_image(tree) as root:
        f = image_facts(root, cmdline=CMDLINE)
    rules = {r.id: r for r in load_rules("image")}
    return f, {rid: evaluate(rules[rid], f, {"image_kind": "directory"}) for rid in SYSCTL_RULE_IDS}


@pytest.mark.parametrize(("init", "extra", "applier"), [
    ("#!/bin/sh\n. /etc/init.d/functions\napply_sysctls\nexec /usr/bin/kata-agent\n",
     {"etc/init.d/functions": 'apply_sysctls() {\n  for f in /etc/sysctl.d/*.conf; do\n'
                              '    busybox sysctl -e -p "$f"\n  done\n}\n'}, "/etc/init.d/functions"),
    ("#!/bin/sh\nsysctl -p -q /etc/sysctl.d/90-kata-hardening.conf\nexec /usr/bin/kata-agent\n", {}, "sysctl -p"),
    ("#!/bin/sh\n/sbin/sysctl --system >/dev/null\nexec /usr/bin/kata-agent\n", {}, "--system"),
    ("#!/bin/sh\ncat /etc/sysctl.d/*.conf | while IFS='= ' read -r k v; do\n"
     "  echo \"$v\" > /proc/sys/$(echo \"$k\" | tr . /)\ndone\nexec /usr/bin/kata-agent\n", {}, "/proc/sys"),
    ("#!/bin/sh\nsource /lib/kata/boot.sh\nexec /usr/bin/kata-agent\n",
     {"lib/kata/boot.sh": "for conf in /etc/sysctl.d/*; do sysctl -qp \"$conf\"; done\n"}, "/lib/kata/boot.sh"),
])
def test_sysctl_d_applied_by_ordinary_inits(tmp_path: Path, init: str, extra: dict[str, str],
                                            applier: str) -> None:
    f, outcomes = sysctl_outcomes(init_tree(tmp_path / "t", init, extra))
    assert applier in f["sysctl.applied_by"], f["sysctl.applied_by"]
    assert {rid: o.status for rid, o in outcomes.items()} == dict.fromkeys(SYSCTL_RULE_IDS, "pass")


def test_sysctl_cannot_tell_is_not_reported_as_not_set(tmp_path: Path) -> None:
    """An init that hands over to a program that cannot be read as a script: cannot tell, not "not set"."""
    tree = init_tree(tmp_path / "t", "#!/bin/sh\nexec /usr/local/bin/vendor-init\n")
    _exe(tree, "usr/local/bin/vendor-init")  # an ELF binary
    f, outcomes = sysctl_outcomes(tree)
    assert f["sysctl.applied_by"].startswith("cannot tell") and "/usr/local/bin/vendor-init" in f["sysctl.applied_by"]
    for outcome in outcomes.values():
        assert outcome.status == "notapplicable" and "cannot tell" in outcome.message, outcome
    # an init that plainly applies nothing is still "not set"
    tree = init_tree(tmp_path / "n", "#!/bin/sh\nexec /usr/bin/kata-agent\n")
    f, outcomes = sysctl_outcomes(tree)
    assert f["sysctl.applied_by"] == "nothing" and outcomes["KATA-IMG-016"].status == "fail"


def test_extra_shells_are_named_by_path(images: dict[str, Path]) -> None:
    outcome = judge_all(images["baseline"])["KATA-IMG-006"]
    assert outcome.status == "fail"
    for shell in ("/usr/bin/bash", "/usr/bin/dash", "/usr/bin/busybox"):
        assert shell in outcome.message, outcome.message


def test_findings_name_the_paths_they_are_about(images: dict[str, Path]) -> None:
    """Findings whose value is a yes/no or a number say which files they are about."""
    with open_image(images["baseline"]) as root:
        f = image_facts(root, cmdline=CMDLINE)
    assert f.about(["init.kind"]) == {"init.path": "/sbin/init", "init.target": "/usr/lib/systemd/systemd"}
    assert f.about(["agent.root_owned_not_writable"])["agent.path"] == "/usr/bin/kata-agent"
    sysctl = f.about(["sysctl.kernel.kptr_restrict"])
    assert sysctl["sysctl.applied_by"] == "systemd-sysctl" and "sysctl.files" in sysctl
    assert "/etc/fstab" in f.about(["root.readonly"])["root.readonly_reason"]
    assert f.about(["image.setuid_files"]) == {}  # already a list of paths


def test_conditional_proc_sys_write_counts_only_when_its_file_test_holds(tmp_path: Path) -> None:
    """`if [ -f /etc/kata-guest/lock-modules ]; then echo 1 > /proc/sys/kernel/modules_disabled; fi` (the
    reference agent's shape) sets the value only when the image has that file."""
    init = ("#!/bin/sh\nif [ -f /etc/kata-guest/lock-modules ]; then\n"
            "  echo 1 > /proc/sys/kernel/modules_disabled\nfi\nexec /usr/bin/kata-agent\n")
    f, outcomes = sysctl_outcomes(init_tree(tmp_path / "off", init))
    assert "sysctl.kernel.modules_disabled" not in f and outcomes["KATA-IMG-027"].status == "fail"
    f, outcomes = sysctl_outcomes(init_tree(tmp_path / "on", init, {"etc/kata-guest/lock-modules": ""}))
    assert f["sysctl.kernel.modules_disabled"] == 1 and outcomes["KATA-IMG-027"].status == "pass"


def test_accounts_and_units_are_named_where_they_are_defined(images: dict[str, Path]) -> None:
    """The accounts findings name each account with the file and line that defines it, and the services
    finding names each unit by its file and the link that enables it (not only a name or a count)."""
    outcomes = judge_all(images["baseline"])
    assert outcomes["KATA-IMG-004"].actual == ["toor (/etc/passwd:2)"]
    assert outcomes["KATA-IMG-005"].actual == ["root (/etc/shadow:1)"]
    with open_image(images["baseline"]) as root:
        f = image_facts(root, cmdline=CMDLINE)
    units = f.about(["services.enabled"])["services.units"]
    assert "ssh.service: /lib/systemd/system/ssh.service (enabled by " \
           "/etc/systemd/system/multi-user.target.wants/ssh.service)" in units
    assert "getty@tty1.service: /lib/systemd/system/getty@.service (enabled by " \
           "/etc/systemd/system/getty.target.wants/getty@tty1.service)" in units
    with open_image(images["minimal"]) as root:  # no systemd: no unit is started, none is named
        assert image_facts(root, cmdline=CMDLINE).about(["services.enabled"]) == {"services.units": []}


def test_surface_budget_names_what_is_new(images: dict[str, Path]) -> None:
    """KATA-IMG-100's finding names the new setuid files, executables and units, not only their numbers."""
    base, mini = measure(images["baseline"], "baseline"), measure(images["minimal"], "minimal")
    grown = {line.split(":", 1)[0]: line for line in over_budget(mini, base, 10.0)}
    assert grown["setuid/setgid files"].endswith("new: /usr/bin/su)")
    assert "/usr/sbin/sshd" in grown["executables"]
    assert "ssh.service: /lib/systemd/system/ssh.service" in grown["enabled services"]


def test_sysctl_files_the_init_applies_override_the_kernel_command_line(tmp_path: Path) -> None:
    """The kernel applies sysctl.* parameters before init; a file the init applies afterwards wins. An image
    whose sysctl.d lowers what kernel_params set is judged by the lowered value."""
    tree = minimal_tree(tmp_path / "t")
    (tree / "etc/sysctl.d/90-kata-hardening.conf").write_text(HARDENING_SYSCTLS.replace(
        "kernel.sysrq = 0", "kernel.sysrq = 1").replace("kernel.yama.ptrace_scope = 2", "kernel.yama.ptrace_scope = 3"))
    with open_image(tree) as root:
        f = image_facts(root, cmdline=CMDLINE + " sysctl.kernel.sysrq=0 sysctl.kernel.yama.ptrace_scope=1")
    assert f["sysctl.kernel.sysrq"] == 1 and f["sysctl.kernel.yama.ptrace_scope"] == 3
    rule = next(r for r in load_rules("image") if r.id == "KATA-IMG-028")
    assert evaluate(rule, f, {}).status == "fail"
    with open_image(tree) as root:  # a key only the command line sets keeps its value
        f = image_facts(root, cmdline=CMDLINE + " sysctl.kernel.core_pattern=|/bin/false")
    assert f["sysctl.kernel.core_pattern"] == "|/bin/false"


@pytest.mark.slow
def test_hardened_reference_sysctls_come_from_the_image_over_the_command_line() -> None:
    """The real hardened reference: its configuration's kernel_params set kernel.yama.ptrace_scope=1 and its
    guest's sysctl.d sets 3, applied by the init after the kernel: the image's value is what the guest has."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from reference import ensure_reference

    from pytest_kata.bundle import open_bundle
    from pytest_kata.images.facts import root_attachment

    bundle = open_bundle(ensure_reference("candidate", "hardened"))
    config = bundle.shim("qemu").config
    cmdline = root_attachment(config).cmdline(config)
    assert "sysctl.kernel.yama.ptrace_scope=1" in cmdline
    f = _facts(bundle.path("share/kata-containers/kata-containers.img"), cmdline)
    assert f["sysctl.kernel.yama.ptrace_scope"] == 3 and f["sysctl.kernel.kptr_restrict"] == 2


def _tamper_agent(image: Path, offset: int, line: str, tmp_path: Path) -> None:
    """Add ``line`` to the placeholder agent of an ext4 guest image (debugfs, no mount), before it locks
    module loading."""
    import subprocess

    spec = f"{image}?offset={offset}"
    text = subprocess.run(["debugfs", "-R", "cat /usr/bin/kata-agent", spec], capture_output=True, text=True,
                          check=True).stdout
    anchor = "if [ -f /etc/kata-guest/lock-modules ]; then"
    assert anchor in text
    agent = tmp_path / "kata-agent"
    agent.write_text(text.replace(anchor, f"{line}\n{anchor}"))
    agent.chmod(0o755)
    commands = tmp_path / "debugfs.cmd"
    commands.write_text(f"cd /usr/bin\nrm kata-agent\nwrite {agent} kata-agent\nsif kata-agent mode 0100755\n"
                        "sif kata-agent uid 0\nsif kata-agent gid 0\n")
    subprocess.run(["debugfs", "-w", "-f", str(commands), spec], capture_output=True, text=True, check=True)


@pytest.mark.slow
@pytest.mark.vm
def test_boot_sysctls_are_judged_by_what_the_booted_guest_reads_back(tmp_path: Path) -> None:
    """KATA-IMG-101 boots the real hardened reference and reads /proc/sys: every sysctl rule holds, and
    kernel.yama.ptrace_scope is the image's 3 over the command line's 1. A copy whose agent sets
    kernel.sysrq=1 in a way no reading of the files can see (printf, no sysctl file) passes the static
    KATA-IMG-028 but fails KATA-IMG-101 by the value the guest has."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    from reference import ensure_reference

    from pytest_kata.images.guest import build_guest

    root = ensure_reference("candidate", "hardened")

    def run(candidate: Path) -> dict[str, Any]:
        report = tmp_path / "verdict.json"
        report.unlink(missing_ok=True)
        _run_suite("--kata-candidate", str(candidate), "-k", "test_boot_sysctls_read_back or KATA-IMG-028",
                   cwd=tmp_path)
        return {r["id"]: r for r in json.loads(report.read_text())["results"]}

    results = run(root)
    if results["KATA-IMG-101"]["status"] == "skipped":
        pytest.skip(f"no guest can boot here: {results['KATA-IMG-101']['evidence']}")
    assert results["KATA-IMG-101"]["status"] == "pass", results["KATA-IMG-101"]
    booted = results["KATA-IMG-101"]["evidence"]["booted"]
    assert booted["kernel.yama.ptrace_scope"] == "3" and booted["kernel.sysrq"] == "0"
    assert booted["kernel.modules_disabled"] == "1"

    tampered = tmp_path / "tampered"
    shutil.copytree(root, tampered, symlinks=True)
    image = (tampered / "opt/kata/share/kata-containers/kata-containers.img").resolve()
    _tamper_agent(image, build_guest("minimal").partition_offset, "printf 1 > /proc/sys/kernel/sysrq", tmp_path)
    results = run(tampered)
    assert results["KATA-IMG-028"]["status"] == "pass"  # the static reading cannot see the printf
    assert results["KATA-IMG-101"]["status"] == "fail", results["KATA-IMG-101"]
    assert results["KATA-IMG-101"]["evidence"]["booted"]["kernel.sysrq"] == "1"
    assert "KATA-IMG-028: sysctl.kernel.sysrq is 1, expected == 0" in json.dumps(results["KATA-IMG-101"])


def test_boot_sysctl_read_back_skips_when_no_guest_can_boot(images: dict[str, Path], tmp_path: Path) -> None:
    """A candidate without a guest kernel cannot be booted: KATA-IMG-101 is skipped with the reason, never
    passed on the static reading."""
    bundle = _bundle_with(images["minimal"], tmp_path / "nokernel")
    _run_suite("--kata-candidate", str(bundle), "--kata-shim", "qemu", "-k", "test_boot_sysctls_read_back",
               cwd=tmp_path)
    result = next(r for r in json.loads((tmp_path / "verdict.json").read_text())["results"]
                  if r["id"] == "KATA-IMG-101")
    assert result["status"] == "skipped" and "no guest of the candidate can be booted here" in json.dumps(result)
