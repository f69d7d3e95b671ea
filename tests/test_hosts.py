"""Fast tests of the host logic: accelerator choice, domain XML, panic scan, and the fixtures' behaviour
(revert per test, hook before the clean snapshot, kata_dirty, kata_hosts(n), artefacts, keep-on-failure,
panic policy) with a fake Host behind the Protocol. The real libvirt path is in test_hosts_libvirt.py."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_kata.hosts.accel import detect_accel, detect_from_capabilities, detect_local, is_local_uri
from pytest_kata.hosts.base import Host
from pytest_kata.hosts.image import load_recipe
from pytest_kata.hosts.libvirt import HostSpec, domain_xml, host_name, scan_for_panics
from pytest_kata.hosts.provision import HostPool, PoolSettings


def fake_machine(tmp_path: Path, *, kvm: bool = True, pvm: bool = False, flags: str = "fpu svm") -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    if kvm:
        (tmp_path / "dev").mkdir()
        (tmp_path / "dev/kvm").write_text("")
    if pvm:
        (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize(("kvm", "pvm", "flags", "expected", "why"), [
    (True, False, "fpu svm", "kvm", "svm"),
    (True, False, "fpu vmx", "kvm", "vmx"),
    (True, True, "fpu svm", "tcg", "PVM"),
    (True, False, "fpu hypervisor", "tcg", "no svm/vmx"),
    (False, False, "fpu svm", "tcg", "no /dev/kvm"),
])
def test_detect_local(tmp_path: Path, kvm: bool, pvm: bool, flags: str, expected: str, why: str) -> None:
    accel, reason = detect_local(fake_machine(tmp_path, kvm=kvm, pvm=pvm, flags=flags))
    assert accel == expected
    assert why in reason


def test_this_machine_is_detected_as_tcg_because_of_pvm() -> None:
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("not a PVM machine")
    assert detect_accel("auto") == ("tcg", "/dev/kvm is PVM (kvm_pvm): stock guests cannot run on it")


CAPS = """<capabilities><host><cpu><arch>x86_64</arch>{features}</cpu></host>
<guest><arch name='x86_64'><domain type='qemu'/>{kvm}</arch></guest></capabilities>"""


def test_remote_accel_from_capabilities() -> None:
    assert detect_from_capabilities(CAPS.format(features="<feature name='svm'/>", kvm="<domain type='kvm'/>"))[0] \
        == "kvm"
    assert detect_from_capabilities(CAPS.format(features="<feature name='svm'/>", kvm=""))[0] == "tcg"
    assert detect_from_capabilities(CAPS.format(features="<feature name='hypervisor'/>",
                                                kvm="<domain type='kvm'/>"))[0] == "tcg"


def test_forced_accel_and_uri_kinds() -> None:
    assert detect_accel("kvm") == ("kvm", "forced by --kata-accel")
    assert detect_accel("tcg")[0] == "tcg"
    with pytest.raises(ValueError):
        detect_accel("hvf")
    assert is_local_uri("qemu:///system") and not is_local_uri("qemu+ssh://root@hv1/system")


def _spec(accel: str) -> HostSpec:
    return HostSpec(image=Path("/img"), kernel=Path("/k"), initrd=None, cmdline="root=/dev/vda console=ttyS0",
                    accel=accel)


def test_domain_xml_tcg_and_kvm() -> None:
    name = host_name(7, run_id="kt-0123abcd")
    assert name.startswith("kt-0123abcd-") and name.endswith("-h7")
    tcg = ET.fromstring(domain_xml(name, _spec("tcg"), Path("/o.qcow2"), "kt-0123abcd"))
    assert tcg.get("type") == "qemu"
    assert tcg.find("cpu").get("mode") == "maximum"  # kvm_amd must load inside the host
    assert tcg.findtext("name") == name
    assert "kt-0123abcd" in ET.tostring(tcg.find("metadata"), encoding="unicode")
    assert tcg.find("os/initrd") is None
    kvm = ET.fromstring(domain_xml(name, _spec("kvm"), Path("/o.qcow2"), "kt-0123abcd"))
    assert kvm.get("type") == "kvm" and kvm.find("cpu").get("mode") == "host-passthrough"


def test_panic_scan() -> None:
    text = "ok\n[  3.1] Kernel panic - not syncing: VFS\n[ 4.0] BUG: kernel NULL pointer\n[ 4.1]  Call Trace:\nfine"
    assert len(scan_for_panics(text)) == 3
    assert scan_for_panics("systemd[1]: Started containerd.\nkt-host# ") == []
    assert scan_for_panics("grep output: BUG: in a file\n") == [], "command output is not a kernel message"
    assert scan_for_panics("grep output: BUG: in a file\n", kernel_lines_only=False)


def test_recipe_is_valid() -> None:
    recipe = load_recipe()
    assert {"containerd", "runc", "qemu-system-x86", "systemd-sysv"} <= set(recipe.packages)
    assert "kernel/drivers/vhost" in recipe.data["kernel"]["module_trees"]
    assert recipe.prompt == "kt-host# " and "console=ttyS0" in recipe.cmdline


def test_bad_recipe_is_one_line(tmp_path: Path) -> None:
    from pytest_kata.errors import KataError

    bad = tmp_path / "recipe.toml"
    bad.write_text("packages = [\n")
    with pytest.raises(KataError, match=r"recipe.toml: host image recipe is not valid TOML"):
        load_recipe(bad)


# ------------------------------------------------------------------------------------------ fake hosts
class FakeHost:
    """Records what the pool does to it: snapshots, reverts, closes, hook calls."""

    booted = 0

    def __init__(self, events: list[str]) -> None:
        FakeHost.booted += 1
        self.name = f"fake-h{FakeHost.booted}"
        self.events = events
        self.files: set[str] = set()
        self.saved: dict[str, set[str]] = {}
        self.closed = False
        self.dom = object()
        self.uri = "test:///default"
        self.log = "boot ok\n"

    def run(self, cmd, *, timeout=600.0, check=False, stdin=None):
        from pytest_kata.hosts.base import RunResult

        if cmd.startswith("touch "):
            self.files.add(cmd.split()[1])
        return RunResult(cmd, 0, " ".join(sorted(self.files)) if cmd == "ls" else "journal line\n", "", 0, self.name)

    def put(self, local, remote, *, mode=None): ...
    def get(self, remote, local): ...
    def reboot(self, *, timeout=None): ...

    def snapshot(self, name: str) -> None:
        self.events.append(f"snapshot {self.name} {name}")
        self.saved[name] = set(self.files)

    def revert(self, name: str) -> None:
        self.events.append(f"revert {self.name} {name}")
        self.files = set(self.saved[name])

    def console_log(self) -> str:
        return self.log

    def qemu_log(self) -> str:
        return "qemu log"

    def keep(self) -> str:
        return f"virsh console {self.name}"

    def close(self) -> None:
        self.closed = True
        self.events.append(f"close {self.name}")


def test_fake_host_satisfies_protocol() -> None:
    assert isinstance(FakeHost([]), Host)


def test_pool_snapshots_after_hook_and_reverts_only_used_hosts(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    pool = HostPool(PoolSettings(log_dir=tmp_path), on_ready=lambda h: events.append(f"ready {h.name}"))

    def boot(self: HostPool, **changes: object) -> FakeHost:
        host = FakeHost(events)
        self.on_ready(host)
        return host

    monkeypatch.setattr(HostPool, "boot", boot)
    first = pool.checkout(1)[0]
    assert events == [f"ready {first.name}", f"snapshot {first.name} clean"]
    first.run("touch /root/x")
    again = pool.checkout(1)[0]
    assert again is first and events[-1] == f"revert {first.name} clean" and first.files == set()
    two = pool.checkout(2)
    assert len({h.name for h in two}) == 2
    pool.close()
    assert all(h.closed for h in two)


PYTESTER_CONFTEST = textwrap.dedent("""
    import pytest
    from pytest_kata.hosts import provision
    import test_fakes

    EVENTS = test_fakes.EVENTS

    def _boot(self, **changes):
        host = test_fakes.FakeHost(EVENTS)
        if self.on_ready is not None:
            self.on_ready(host)
        return host

    _original_boot = provision.HostPool.boot
    provision.HostPool.boot = _boot

    def pytest_unconfigure(config):
        provision.HostPool.boot = _original_boot  # in-process runs share the module with the outer session

    @pytest.fixture(scope="session")
    def kata_libvirtd():
        return None

    def pytest_kata_host_ready(host, config):
        EVENTS.append(f"hook {host.name}")
""")


@pytest.fixture
def fake_hosts_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    source = Path(__file__).read_text()
    fake_src = source[source.index("class FakeHost"):source.index("def test_fake_host_satisfies_protocol")]
    pytester.makepyfile(test_fakes="EVENTS = []\n" + fake_src)
    pytester.makeconftest(PYTESTER_CONFTEST)
    return pytester


def test_fixtures_revert_between_tests_and_dirty_gets_fresh(fake_hosts_dir: pytest.Pytester) -> None:
    fake_hosts_dir.makepyfile(test_use=textwrap.dedent("""
        import pytest
        from test_fakes import EVENTS

        def test_a(kata_host):
            kata_host.run("touch /leak")

        def test_b(kata_host):
            assert kata_host.files == set(), "test_a's change must be reverted"
            assert [e.split()[0] for e in EVENTS[:3]] == ["hook", "snapshot", "revert"]

        @pytest.mark.kata_dirty
        def test_dirty(kata_host):
            assert kata_host.name != "fake-h1"
            EVENTS.append("dirty ran on " + kata_host.name)

        @pytest.mark.kata_hosts(2)
        def test_two(kata_hosts):
            assert len({h.name for h in kata_hosts}) == 2
            assert len(kata_hosts(3)) == 3

        def test_after(kata_host):
            dirty = [e for e in EVENTS if e.startswith("dirty ran on ")][0].split()[-1]
            assert f"close {dirty}" in EVENTS, "the kata_dirty host is destroyed after its test"
    """))
    result = fake_hosts_dir.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=5)


def test_failure_attaches_artefacts_and_keeps_host(fake_hosts_dir: pytest.Pytester) -> None:
    fake_hosts_dir.makepyfile(test_fail=textwrap.dedent("""
        def test_fails(kata_host):
            kata_host.log += "something the test caused\\n"
            assert False, "boom"

        def test_next_gets_another_host(kata_host):
            assert kata_host.name != "fake-h1"
    """))
    alluredir = fake_hosts_dir.path / "allure"
    from pytest_kata import runid
    from pytest_kata.sweep import sweep

    before = set(runid.state_dir().glob("kt-*/kept"))
    try:
        result = fake_hosts_dir.runpytest_inprocess("-p", "no:cacheprovider", "-rA", "--kata-keep-on-failure",
                                                    f"--alluredir={alluredir}")
    finally:  # the inner run is kept on purpose: remove it, so this test leaves nothing behind
        for kept in set(runid.state_dir().glob("kt-*/kept")) - before:
            sweep(dead_only=False, run_id=kept.parent.name)
    result.assert_outcomes(passed=1, failed=1)
    attachments = [p.read_text() for p in alluredir.glob("*-attachment.txt")]
    assert any("something the test caused" in text for text in attachments), "console attached to allure"
    out = result.stdout.str()
    assert "console since test start" in out and "something the test caused" in out
    assert "journal since test start" in out and "qemu log" in out
    assert "left running for inspection: virsh console fake-h1" in out


def test_failure_without_keep_reuses_the_host(fake_hosts_dir: pytest.Pytester) -> None:
    fake_hosts_dir.makepyfile(test_fail=textwrap.dedent("""
        def test_fails(kata_host):
            assert False

        def test_next(kata_host):
            assert kata_host.name == "fake-h1"
    """))
    fake_hosts_dir.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1)


@pytest.mark.parametrize(("policy", "outcome"), [("fail", {"passed": 1, "errors": 1}),
                                                 ("warn", {"passed": 1, "warnings": 1}),
                                                 ("ignore", {"passed": 1})])
def test_kernel_panic_policy(fake_hosts_dir: pytest.Pytester, policy: str, outcome: dict) -> None:
    fake_hosts_dir.makepyfile(test_panic=textwrap.dedent("""
        def test_oops(kata_host):
            kata_host.log += "[ 12.3] BUG: unable to handle page fault\\n"
    """))
    result = fake_hosts_dir.runpytest_inprocess("-p", "no:cacheprovider", f"--kata-host-panic={policy}")
    result.assert_outcomes(**outcome)
    if policy == "fail":
        assert "kernel trouble on the host during the test" in result.stdout.str()


def test_header_reports_accel(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--kata-accel=tcg")
    result.stdout.fnmatch_lines(["kata hosts: libvirt qemu:///system, accel TCG (forced by --kata-accel)*"])


def test_prebuilt_host_image_missing_and_formats(tmp_path: Path) -> None:
    from pytest_kata.errors import KataError
    from pytest_kata.hosts.image import prebuilt_host_image

    if not list(Path("/boot").glob("vmlinuz-*")):
        pytest.skip("no Debian kernel in /boot")
    with pytest.raises(KataError, match=r"host.qcow2: host image not found \(build one with"):
        prebuilt_host_image(tmp_path / "host.qcow2")
    (tmp_path / "host.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 100)
    (tmp_path / "host.img").write_bytes(b"\0" * 100)
    assert prebuilt_host_image(tmp_path / "host.qcow2").image_format == "qcow2"
    assert prebuilt_host_image(tmp_path / "host.img").image_format == "raw"


def test_ssh_provider_without_hosts_is_a_one_line_error(tmp_path: Path) -> None:
    from pytest_kata.hosts.base import HostError

    with pytest.raises(HostError, match="needs --kata-ssh-hosts"):
        HostPool(PoolSettings(provider="ssh", log_dir=tmp_path)).boot()
    local = HostPool(PoolSettings(provider="local", log_dir=tmp_path)).checkout(1)[0]
    assert local.run("echo hi").stdout == "hi\n"
