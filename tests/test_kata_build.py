"""``pytest-kata build --from-source``: source discovery on fake archive trees, and real builds of 1.11.0/1.11.5.

The fast tests build small archives with upstream's layout (``kata-<repo>-<V>.tar.xz``, top directory
``kata-<repo>-<V>/``, ``VERSION`` inside) for releases that are not shipped here (1.10.x, 1.12.x), to show
that nothing depends on the two 1.11 releases. The slow tests build real bundles from ``../shared/kata-src``
and check them with :func:`pytest_kata.bundle.open_bundle`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from pytest_kata.bundle import open_bundle, unpack_archive
from pytest_kata.cli import main
from pytest_kata.errors import BundleError, KataError
from pytest_kata.images.common import HostKernel
from pytest_kata.images.guest import module_load_order
from pytest_kata.kata_build.build import _run_make, go_toolchain, select_guest
from pytest_kata.kata_build.image_mode import IMAGE_BOUNDARY, IMAGE_MODE_BUILTINS, PFN_INFO_OFFSET, image_mode_gaps
from pytest_kata.kata_build.kernel_choice import bundle_kernel, bzimage_release, guest_kernel
from pytest_kata.kata_build.smoke import boot_agent
from pytest_kata.kata_build.sources import REPOS, SourceError, discover

REPO = Path(__file__).resolve().parents[1]
KATA_SRC = REPO.parent / "shared" / "kata-src"


def _archive(directory: Path, repo: str, version: str, *, top: str | None = None,
             version_text: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """A tiny upstream-style source archive: ``kata-<repo>-<V>/VERSION`` (+ ``extra`` files)."""
    top = top or f"kata-{repo}-{version}"
    path = directory / f"kata-{repo}-{version}.tar.xz"
    files = {"VERSION": f"{version_text or version}\n".encode(), "Makefile": b"all:\n", **(extra or {})}
    with tarfile.open(path, "w:xz") as tar:
        info = tarfile.TarInfo(top)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _release(directory: Path, version: str, repos: tuple[str, ...] = REPOS) -> None:
    for repo in repos:
        _archive(directory, repo, version)


@pytest.mark.parametrize("version", ["1.10.0", "1.10.9", "1.12.0", "1.12.1", "1.11.0-rc0"])
def test_discovers_any_1x_release_from_its_archives(tmp_path: Path, version: str) -> None:
    _release(tmp_path, version)
    found = discover(tmp_path, version)
    assert found.version == version
    assert set(found.sources) == set(REPOS)
    runtime = found["runtime"]
    assert runtime.kind == "archive" and runtime.top == f"kata-runtime-{version}"
    assert runtime.read_text("VERSION") == f"{version}\n"


def test_version_is_read_from_the_sources_when_only_one_release_is_present(tmp_path: Path) -> None:
    _release(tmp_path, "1.12.1")
    assert discover(tmp_path).version == "1.12.1"


def test_two_releases_need_version_and_it_picks_the_archives(tmp_path: Path) -> None:
    _release(tmp_path, "1.10.3")
    _release(tmp_path, "1.12.0")
    with pytest.raises(SourceError, match=r"pick a release with --version .*1\.10\.3, 1\.12\.0"):
        discover(tmp_path)
    chosen = discover(tmp_path, "1.10.3")
    assert {s.path.name for s in chosen.sources.values()} == {f"kata-{r}-1.10.3.tar.xz" for r in REPOS}


def test_version_mismatch_with_the_runtime_version_file_is_one_line(tmp_path: Path) -> None:
    _release(tmp_path, "1.12.0", ("agent", "proxy"))
    _archive(tmp_path, "runtime", "1.12.0", version_text="1.12.1")
    with pytest.raises(SourceError) as info:
        discover(tmp_path, "1.12.0")
    message = str(info.value)
    assert "kata-runtime-1.12.0.tar.xz" in message and "VERSION says 1.12.1" in message
    assert "\n" not in message


def test_component_of_another_release_is_refused(tmp_path: Path) -> None:
    _release(tmp_path, "1.10.2", ("runtime", "proxy"))
    _archive(tmp_path, "agent", "1.10.2", version_text="1.10.1")
    with pytest.raises(SourceError, match=r"kata-agent-1\.10\.2\.tar\.xz: the agent sources are version 1\.10\.1"):
        discover(tmp_path, "1.10.2")


def test_missing_required_archive_names_it(tmp_path: Path) -> None:
    _release(tmp_path, "1.12.0", ("runtime", "proxy", "osbuilder", "packaging"))
    with pytest.raises(SourceError, match=r"missing the agent sources: no kata-agent-1\.12\.0\.tar\.xz"):
        discover(tmp_path, "1.12.0")


def test_osbuilder_and_packaging_are_optional(tmp_path: Path) -> None:
    _release(tmp_path, "1.10.0", ("runtime", "agent", "proxy"))
    assert set(discover(tmp_path, "1.10.0").sources) == {"runtime", "agent", "proxy"}


def test_wrong_top_directory_is_refused(tmp_path: Path) -> None:
    _release(tmp_path, "1.12.0", ("agent", "proxy"))
    _archive(tmp_path, "runtime", "1.12.0", top="runtime-1.12.0")
    with pytest.raises(SourceError, match=r"top directory is 'runtime-1\.12\.0', expected 'kata-runtime-1\.12\.0'"):
        discover(tmp_path, "1.12.0")


@pytest.mark.parametrize("version", ["2.0.0", "3.2.0", "banana"])
def test_non_1x_version_is_refused(tmp_path: Path, version: str) -> None:
    with pytest.raises(SourceError, match=r"not a Kata 1\.x release"):
        discover(tmp_path, version)


def test_runtime_version_file_of_2x_is_refused(tmp_path: Path) -> None:
    for repo in ("runtime", "agent", "proxy"):
        (tmp_path / repo).mkdir()
        (tmp_path / repo / "VERSION").write_text("2.0.0\n")
    with pytest.raises(SourceError, match=r"VERSION says '2\.0\.0': not a Kata 1\.x release"):
        discover(None, None, {r: tmp_path / r for r in ("runtime", "agent", "proxy")})


def test_checkouts_and_per_repository_overrides(tmp_path: Path) -> None:
    """A directory of checkouts (named like the repositories) and one repository given on its own."""
    checkouts = tmp_path / "checkouts"
    for repo in ("runtime", "proxy"):
        (checkouts / repo).mkdir(parents=True)
        (checkouts / repo / "VERSION").write_text("1.12.1\n")
    agent = _archive(tmp_path, "agent", "1.12.1")
    found = discover(checkouts, "1.12.1", {"agent": agent})
    assert found["runtime"].kind == "checkout" and found["agent"].kind == "archive"
    assert found.version == "1.12.1"


def test_unknown_repository_and_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown Kata repository shim"):
        discover(tmp_path, "1.12.0", {"shim": tmp_path})
    with pytest.raises(SourceError, match="not a directory of Kata sources"):
        discover(tmp_path / "nope", "1.12.0")


def test_source_archive_unpack_refuses_a_member_outside_its_top_directory(tmp_path: Path) -> None:
    """Source archives go through the bundle opener's checked extraction, with their own top directory."""
    path = _archive(tmp_path, "runtime", "1.12.0")
    with tarfile.open(path, "r:xz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]  # type: ignore[union-attr]
    evil = tmp_path / "evil.tar.xz"
    with tarfile.open(evil, "w:xz") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
        info = tarfile.TarInfo("kata-runtime-1.12.0/../../etc/cron.d/x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    files, sha = unpack_archive(path, tmp_path / "good", prefix="kata-runtime-1.12.0")
    assert {"VERSION", "Makefile"} <= set(files) and len(sha) == 64
    assert (tmp_path / "good/kata-runtime-1.12.0/VERSION").read_text() == "1.12.0\n"
    with pytest.raises(BundleError, match=r"climbs out with '\.\.'"):
        unpack_archive(evil, tmp_path / "bad", prefix="kata-runtime-1.12.0")


def test_kernel_release_is_read_from_the_bzimage(tmp_path: Path) -> None:
    kernel = guest_kernel()  # the host's Debian kernel
    assert bzimage_release(kernel.vmlinuz) == kernel.release
    custom = guest_kernel(kernel.vmlinuz, kernel.config)
    assert custom.release == kernel.release and custom.initrd is None
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"\0" * 4096)
    with pytest.raises(KataError, match="not an x86 bzImage"):
        guest_kernel(not_a_kernel, kernel.config)
    with pytest.raises(KataError, match="cannot tell which kernel config"):
        guest_kernel(_copy(kernel.vmlinuz, tmp_path / "k"))  # no config-* beside it
    # Kata's install_kata layout: config-<release> beside vmlinuz-<release>-<config version>, and the
    # kernel builder's config-report.json, which is not a config.
    built = _copy(kernel.vmlinuz, tmp_path / "kata-kernel")
    (built.parent / f"config-{kernel.release}").write_text("CONFIG_VIRTIO_PCI=y\n")
    (built.parent / "config-report.json").write_text("{}")
    assert guest_kernel(built).config == built.parent / f"config-{kernel.release}"


def _copy(src: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir()
    target = dest_dir / "bzImage"
    target.write_bytes(src.read_bytes())
    return target


def test_kernel_without_module_tree_must_have_the_transports_built_in(tmp_path: Path) -> None:
    """The --kernel hook: a kernel built like Kata's has no /lib/modules tree here, so its config decides."""
    names = ["virtio_pci", "virtio_console", "9p", "9pnet_virtio", "vmw_vsock_virtio_transport"]
    config = tmp_path / "config-6.1.192-kata"
    symbols = ["VIRTIO_PCI", "VIRTIO_CONSOLE", "9P_FS", "NET_9P_VIRTIO", "VIRTIO_VSOCKETS"]
    config.write_text("".join(f"CONFIG_{s}=y\n" for s in symbols))
    kernel = HostKernel(tmp_path / "vmlinuz", None, config, "6.1.192-kata-no-such-modules")
    assert module_load_order(kernel, names) == []  # nothing to copy, nothing for the pre-init to load
    config.write_text(config.read_text().replace("CONFIG_VIRTIO_CONSOLE=y", "CONFIG_VIRTIO_CONSOLE=m"))
    with pytest.raises(KataError, match=r"'virtio_console' is needed but .* CONFIG_VIRTIO_CONSOLE is not =y"):
        module_load_order(kernel, names)


# The lines of the 1.11 runtime's configuration templates that name the guest (cli/config/*.toml.in, rendered).
QEMU_RENDER = ('[hypervisor.qemu]\npath = "/opt/kata/bin/qemu-system-x86_64"\n'
               'kernel = "/opt/kata/share/kata-containers/vmlinuz.container"\n'
               'initrd = "/opt/kata/share/kata-containers/kata-containers-initrd.img"\n'
               'image = "/opt/kata/share/kata-containers/kata-containers.img"\nmachine_type = "pc"\n')
FC_RENDER = '[hypervisor.firecracker]\nimage = "/opt/kata/share/kata-containers/kata-containers.img"\n'


def _defaults(tmp_path: Path) -> Path:
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    (defaults / "configuration-qemu.toml").write_text(QEMU_RENDER)
    (defaults / "configuration-fc.toml").write_text(FC_RENDER)
    (defaults / "configuration-qemu-virtiofs.toml").write_text(QEMU_RENDER)  # not among the files upstream edits
    return defaults


def test_image_is_the_default_guest_as_upstream_release_script_leaves_it(tmp_path: Path) -> None:
    """kata-deploy-binaries.sh: sed -i -e '/^initrd =/d' on configuration-qemu.toml and configuration-fc.toml."""
    defaults = _defaults(tmp_path)
    initrd_line = 'initrd = "/opt/kata/share/kata-containers/kata-containers-initrd.img"'
    assert select_guest(defaults, "image") == {"configuration-qemu.toml": initrd_line}
    assert (defaults / "configuration-qemu.toml").read_text() == QEMU_RENDER.replace(initrd_line + "\n", "")
    assert (defaults / "configuration-fc.toml").read_text() == FC_RENDER
    assert (defaults / "configuration-qemu-virtiofs.toml").read_text() == QEMU_RENDER


def test_initrd_guest_deletes_the_image_line_only_where_an_initrd_replaces_it(tmp_path: Path) -> None:
    defaults = _defaults(tmp_path)
    assert select_guest(defaults, "initrd") == {
        "configuration-qemu.toml": 'image = "/opt/kata/share/kata-containers/kata-containers.img"'}
    qemu = (defaults / "configuration-qemu.toml").read_text()
    assert "initrd = " in qemu and "\nimage = " not in qemu
    assert (defaults / "configuration-fc.toml").read_text() == FC_RENDER  # its only guest stays


def _kernel_with(tmp_path: Path, config_text: str) -> HostKernel:
    config = tmp_path / "config-6.1.192"
    config.write_text(config_text)
    return HostKernel(tmp_path / "vmlinuz-6.1.192-76", None, config, "6.1.192")


def test_image_mode_needs_the_nvdimm_drivers_built_in(tmp_path: Path) -> None:
    """Debian's kernel has the NVDIMM, ext4 and virtio drivers as modules: it cannot boot Kata's image mode
    (no initrd loads them). The build refuses it in one line naming the options; the initrd form takes it."""
    (tmp_path / "src").mkdir()
    _release(tmp_path / "src", "1.12.0", ("runtime", "agent", "proxy"))
    sources = discover(tmp_path / "src", "1.12.0")  # no packaging: Debian's kernel by default
    debian = guest_kernel()
    assert "CONFIG_BLK_DEV_PMEM=m" in image_mode_gaps(debian.config)
    with pytest.raises(KataError) as info:
        bundle_kernel(sources, None, "image")
    message = str(info.value)
    assert message.startswith(str(debian.config)) and "cannot boot Kata's image mode" in message
    assert "CONFIG_BLK_DEV_PMEM=m" in message and "\n" not in message and "--guest initrd" in info.value.hint
    kernel, origin = bundle_kernel(sources, None, "initrd")
    assert kernel == debian and origin.startswith("Debian's")
    built_in = _kernel_with(tmp_path, "".join(f"{name}=y\n" for name in IMAGE_MODE_BUILTINS))
    assert image_mode_gaps(built_in.config) == []
    assert bundle_kernel(sources, built_in, "image") == (built_in, f"given with --kernel ({built_in.vmlinuz})")
    one_module = _kernel_with(tmp_path, built_in.config.read_text().replace("CONFIG_ACPI_NFIT=y", "CONFIG_ACPI_NFIT=m"))
    with pytest.raises(KataError, match=r"drivers: CONFIG_ACPI_NFIT=m \(use --guest initrd"):
        bundle_kernel(sources, one_module, "image")
    with pytest.raises(KataError, match="unknown guest form 'disk'"):
        bundle_kernel(sources, built_in, "disk")


def test_missing_go_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KataError, match=r"go is not installed: .*golang-go") as info:
        go_toolchain()
    assert "apt-get install golang-go" in str(info.value)


def test_build_error_names_the_log_and_its_tail(tmp_path: Path) -> None:
    """A failing upstream make (here a real make on a tiny Makefile) ends in one line with the log's tail."""
    tree = tmp_path / "runtime"
    tree.mkdir()
    (tree / "Makefile").write_text("all:\n\t@echo compiling virtcontainers\n"
                                   "\t@echo 'qemu.go:12: undefined: govmmQemu.Foo' >&2\n\t@exit 3\n")
    log = tmp_path / "runtime.log"
    with pytest.raises(KataError) as info:
        _run_make("runtime", tree, [], {"PATH": os.environ["PATH"]}, log)
    message = str(info.value)
    assert message.startswith(f"{log}: building runtime failed") and "exit 2" in message  # make's own status
    assert "undefined: govmmQemu.Foo" in message and "\n" not in message
    assert "compiling virtcontainers" in log.read_text()


def test_cli_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _release(tmp_path, "1.12.0", ("runtime", "proxy"))
    assert main(["build", "--from-source", str(tmp_path), "--version", "1.12.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pytest-kata: error: ") and "missing the agent sources" in err and "\n" not in err
    assert main(["build", "--version", "1.12.0"]) == 2
    assert "give --from-source DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real builds
@pytest.fixture(scope="module")
def kata_src() -> Path:
    if not KATA_SRC.is_dir():
        pytest.skip(f"{KATA_SRC} is absent")
    return KATA_SRC


def _cli_build(src: Path, version: str, out: Path) -> tuple[Path, float, str]:
    start = time.monotonic()
    proc = subprocess.run([str(REPO / ".venv/bin/pytest-kata"), "build", "--from-source", str(src),
                           "--version", version, "--output", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return Path(last), seconds, proc.stdout + proc.stderr


# One worker builds both releases in turn: the second reuses Go's build cache instead of competing for the
# same two cores with a second cold build.
@pytest.mark.slow
@pytest.mark.xdist_group("kata-build")
@pytest.mark.parametrize("version", ["1.11.0", "1.11.5"])
def test_builds_a_real_bundle_from_upstream_source(kata_src: Path, tmp_path: Path, version: str) -> None:
    tarball, first_seconds, _ = _cli_build(kata_src, version, tmp_path)
    assert tarball == (tmp_path / f"kata-static-{version}-amd64.tar.zst").resolve() and tarball.is_file()
    # The same sources again: the content-hash cache answers, no Go build, no guest build.
    again, cached_seconds, output = _cli_build(kata_src, version, tmp_path / "again")
    assert "cached" in output and "go build" not in output
    assert cached_seconds < 30, f"cached build took {cached_seconds:.0f}s (first: {first_seconds:.0f}s)"
    assert again.read_bytes() == tarball.read_bytes()

    bundle = open_bundle(tarball)
    assert bundle.version == version
    for rel in ("bin/containerd-shim-kata-v2", "bin/kata-runtime", "libexec/kata-containers/kata-proxy",
                "libexec/kata-containers/kata-netmon", "bin/qemu-system-x86_64"):
        assert bundle.files[rel].kind == "file" and bundle.files[rel].mode & 0o111, rel
    runtime = subprocess.run([str(bundle.root / "bin/kata-runtime"), "--version"], capture_output=True,
                             text=True, cwd=tmp_path)
    assert re.search(rf"kata-runtime\s*:\s*{re.escape(version)}\b", runtime.stdout), runtime.stdout
    shim = subprocess.run([str(bundle.root / "bin/containerd-shim-kata-v2"), "--version"], capture_output=True,
                          text=True, cwd=tmp_path)
    if "flag provided but not defined: -version" in shim.stderr:
        # 1.11.0's shim vendors a containerd shim library without -version and embeds no version: it can
        # only show that it is a working shim v2 binary (its flags); the release is the runtime's word.
        assert version == "1.11.0", shim.stderr
        usage = subprocess.run([str(bundle.root / "bin/containerd-shim-kata-v2"), "-h"], capture_output=True,
                               text=True, cwd=tmp_path)
        assert "-publish-binary" in usage.stderr and "grpc address back to main containerd" in usage.stderr
        assert "containerd-shim-kata-v2 --version (go)" not in bundle.version_evidence
    else:
        assert re.search(rf"version: {re.escape(version)},", shim.stdout), shim.stdout
        assert bundle.version_evidence["containerd-shim-kata-v2 --version (go)"] == version

    # The runtime Makefile's own render, paths under /opt/kata, as kata-static leaves it: the initrd line of
    # configuration-qemu.toml deleted (upstream's release script), so the NVDIMM image is the default guest.
    assert {"qemu", "qemu-virtiofs", "fc", "clh", "acrn"} <= set(bundle.shims)
    assert bundle.default_shim == "qemu"
    qemu = bundle.shims["qemu"].config
    assert qemu.get("hypervisor.qemu.path") == "/opt/kata/bin/qemu-system-x86_64"
    assert qemu.get("hypervisor.qemu.kernel") == "/opt/kata/share/kata-containers/vmlinuz.container"
    assert qemu.get("hypervisor.qemu.image") == "/opt/kata/share/kata-containers/kata-containers.img"
    assert qemu.get("hypervisor.qemu.initrd", "") == ""
    assert qemu.get("proxy.kata.path") == "/opt/kata/libexec/kata-containers/kata-proxy"
    assert qemu.get("runtime.disable_guest_seccomp") is True  # upstream's 1.x default, kept
    for rel in ("share/kata-containers/vmlinuz.container", "share/kata-containers/kata-containers.img",
                "share/kata-containers/kata-containers-initrd.img"):
        assert bundle.resolve(rel) in bundle.files and bundle.files[bundle.resolve(rel) or ""].kind == "file"
    assert bundle.kernels and bundle.images and bundle.initrds
    record = json.loads(bundle.path("kata-build.json").read_text())
    assert record["guest"]["default"] == "image" and list(record["guest"]["deleted-from-configs"]) == [
        "configuration-qemu.toml"]
    # Kata's guest kernel, built from this release's own packaging fragments, with image mode's drivers built in
    config_version = {"1.11.0": "73", "1.11.5": "76"}[version]
    kernel = bundle.path("share/kata-containers/vmlinuz.container").resolve()
    assert kernel.name.endswith(f"-{config_version}") and f"kata-packaging-{version}" in record["kernel"]["origin"]
    assert image_mode_gaps(bundle.path(f"share/kata-containers/config-{record['kernel']['release']}")) == []
    # the image in osbuilder's NVDIMM layout: the pfn info block 4 KiB in, the size a multiple of 128 MiB
    image = bundle.path("share/kata-containers/kata-containers.img")
    with open(image, "rb") as fh:
        fh.seek(PFN_INFO_OFFSET)
        assert fh.read(16) == b"NVDIMM_PFN_INFO\0"
    assert image.stat().st_size % IMAGE_BOUNDARY == 0

    # The real agent is in the initrd, as /usr/bin/kata-agent, with /sbin/init and /init leading to it.
    initrd = bundle.path("share/kata-containers/kata-containers-initrd.img")
    listing = subprocess.run(f"zcat {initrd} | cpio -t --quiet", shell=True, capture_output=True,
                             text=True).stdout.split()
    for member in ("usr/bin/kata-agent", "sbin/init", "init", "lib64/ld-linux-x86-64.so.2"):
        assert member in listing, member
    agent = subprocess.run(f"zcat {initrd} | cpio -i --quiet --to-stdout usr/bin/kata-agent", shell=True,
                           capture_output=True).stdout
    assert agent.startswith(b"\x7fELF") and version.encode() in agent


@pytest.mark.slow
@pytest.mark.xdist_group("kata-build")
def test_real_agent_starts_as_init_under_tcg(kata_src: Path, tmp_path: Path) -> None:
    """The bundle's kernel + initrd boot with plain qemu and the real agent logs as PID 1 on the console."""
    tarball, _, _ = _cli_build(kata_src, "1.11.5", tmp_path)  # cached by the build test
    bundle = open_bundle(tarball)
    boot = boot_agent(bundle.root, timeout=300)
    first = boot.first_line
    assert re.search(r'name="?kata-agent', first) and re.search(r'pid="?1\b', first), first
    assert re.search(r'version="?1\.11\.5\b', first), first
    assert boot.grpc_started, boot.console[-2000:]


@pytest.mark.slow
def test_agent_smoke_fails_loudly_without_an_agent(tmp_path: Path) -> None:
    """Negative control: a 'bundle' whose initrd holds no agent never logs; the error says so in one line."""
    root = tmp_path / "opt/kata"
    (root / "bin").mkdir(parents=True)
    share = root / "share/kata-containers"
    share.mkdir(parents=True)
    (root / "bin/qemu-system-x86_64").symlink_to("/usr/bin/qemu-system-x86_64")
    (share / "vmlinuz.container").symlink_to(guest_kernel().vmlinuz)
    (share / "kata-containers-initrd.img").write_bytes(b"")  # an empty initramfs: the kernel panics
    with pytest.raises(KataError, match="the agent never logged") as info:
        boot_agent(root, timeout=60)
    assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.xdist_group("kata-build")
def test_builds_from_checkouts_given_per_repository(kata_src: Path, tmp_path: Path) -> None:
    """Git checkouts a user points at (here: the 1.11.5 trees unpacked), one --<repo>-src each, no DIR; the
    packaging archive given the same way supplies Kata's guest kernel (without it the build says, in one line,
    that Debian's kernel cannot boot the image guest)."""
    args = []
    for repo in ("runtime", "agent", "proxy"):
        top = f"kata-{repo}-1.11.5"
        unpack_archive(kata_src / f"{top}.tar.xz", tmp_path / f"unpacked-{repo}", prefix=top)
        args += [f"--{repo}-src", str(tmp_path / f"unpacked-{repo}" / top)]
    refused = subprocess.run([str(REPO / ".venv/bin/pytest-kata"), "build", *args, "--output", str(tmp_path)],
                             capture_output=True, text=True)
    [error] = [line for line in refused.stderr.splitlines() if not line.startswith("[kata")]
    assert refused.returncode == 2 and error.startswith("pytest-kata: error: "), refused.stderr[-2000:]
    assert "cannot boot Kata's image mode" in error and "CONFIG_BLK_DEV_PMEM=m" in error
    args += ["--packaging-src", str(kata_src / "kata-packaging-1.11.5.tar.xz")]
    proc = subprocess.run([str(REPO / ".venv/bin/pytest-kata"), "build", *args, "--output", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tarball = Path(proc.stdout.strip().splitlines()[-1])
    bundle = open_bundle(tarball)
    assert bundle.version == "1.11.5"
    assert bundle.version_evidence["containerd-shim-kata-v2 --version (go)"] == "1.11.5"
    record = json.loads(bundle.path("kata-build.json").read_text())
    assert {record["sources"][r]["kind"] for r in ("runtime", "agent", "proxy")} == {"checkout"}
    assert record["binaries"]["kata-agent"] == "kata-agent version 1.11.5"
