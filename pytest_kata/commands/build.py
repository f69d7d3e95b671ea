"""``pytest-kata build --from-source DIR --version V``: a kata-static bundle of a Kata 1.x release.

    pytest-kata build --from-source ../shared/kata-src --version 1.11.5       # last line: the bundle path
    pytest-kata build --runtime-src ~/go/src/.../runtime --agent-src ... --proxy-src ... --version 1.11.5
    pytest-kata build --from-source DIR --version 1.11.5 --kernel bzImage --kernel-config config
    pytest-kata build --from-source DIR --version 1.11.5 --guest initrd      # configs boot the initrd instead

``DIR`` holds upstream's ``kata-<repo>-<V>.tar.xz`` archives (or checkouts named ``kata-<repo>-<V>`` or
``<repo>``); ``--<repo>-src PATH`` points at one repository's archive or checkout instead. The bundle is
cached by content hash: building the same sources again prints the same path at once. The guest kernel is
Kata's own, built from the release's ``kata-packaging`` sources (cached; a cold build takes 10-40 minutes), and
the configurations boot the guest image as an NVDIMM root, as upstream's kata-static does (``--guest``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pytest_kata.errors import KataError
from pytest_kata.kata_build.build import DEFAULT_GUEST, build_bundle, publish
from pytest_kata.kata_build.kernel_choice import GUESTS, guest_kernel
from pytest_kata.kata_build.sources import REPOS, discover


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a kata-static bundle of a Kata 1.x release from upstream source",
                       description="Builds runtime, shim v2, proxy, netmon and agent with Debian's Go (GOPATH "
                                   "mode), a guest holding the real agent (NVDIMM image and initrd), and packs "
                                   "them with Kata's guest kernel and qemu as kata-static-V-amd64.tar.zst. The "
                                   "last line printed is the bundle path.")
    p.add_argument("--from-source", dest="source_dir", type=Path, metavar="DIR",
                   help="directory of kata-<repo>-<V>.tar.xz archives (or checkouts)")
    p.add_argument("--version", metavar="V",
                   help="release to build (picks the archives; must match the runtime's VERSION file)")
    for repo in REPOS:
        p.add_argument(f"--{repo}-src", dest=f"{repo}_src", type=Path, metavar="PATH",
                       help=f"the {repo} repository: an archive or a checkout (overrides DIR)")
    p.add_argument("--kernel", type=Path, metavar="PATH",
                   help="guest kernel bzImage to ship (default: Kata's guest kernel built from the release's "
                        "kata-packaging sources; Debian's newest when there are none)")
    p.add_argument("--kernel-config", type=Path, metavar="PATH",
                   help="that kernel's config (default: the config-* beside it)")
    p.add_argument("--guest", choices=GUESTS, default=DEFAULT_GUEST,
                   help="the guest form the configurations boot (both are shipped): image, upstream kata-static's "
                        "default (an NVDIMM root; needs a kernel with those drivers built in), or initrd")
    p.add_argument("--output", type=Path, default=Path("."), metavar="DIR",
                   help="where to put the tarball (default: the current directory)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache has this exact build")
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    overrides = {repo: getattr(args, f"{repo}_src") for repo in REPOS if getattr(args, f"{repo}_src")}
    if args.source_dir is None and "runtime" not in overrides:
        raise KataError("give --from-source DIR (or --runtime-src, --agent-src and --proxy-src PATH)")
    sources = discover(args.source_dir, args.version, overrides)
    kernel = guest_kernel(args.kernel, args.kernel_config) if args.kernel or args.kernel_config else None
    result = build_bundle(sources, kernel=kernel, guest=args.guest, force=args.force)
    path = publish(result, args.output)
    how = "built" if result.built else "cached"
    print(f"kata {result.version}: {how} in {result.seconds:.1f}s (key {result.key}, guest {result.guest})")
    print(path.resolve())
    return 0
