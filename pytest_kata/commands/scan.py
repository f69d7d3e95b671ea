"""``pytest-kata scan``: vulnerability scan of a guest image, tailored to the Kata guest.

    pytest-kata scan kata-containers.img --feed debian-tracker.json --sbom sbom.cdx.json --fail-on high
    pytest-kata scan rootfs/ --feed osv-debian/ --feed linux-cve/ --kernel-version 6.18.35 --kernel-config config

Exit status: 0 no finding at or above ``--fail-on``, 1 there are, 2 bad input (one-line error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pytest_kata.bundle import PREFIX, open_bundle
from pytest_kata.errors import KataError, check_output_file
from pytest_kata.images.surface import _bundle_image
from pytest_kata.severities import SEVERITIES
from pytest_kata.vuln import format_table, scan, write_outputs
from pytest_kata.vuln.kernel import kernel_from_bundle_names

BUNDLE_SUFFIXES = (".tar", ".tar.zst", ".tar.xz", ".tar.gz", ".tgz", ".tar.bz2")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scan", help="scan a guest image/initrd/rootfs for known vulnerabilities (offline feeds)",
                       description="Reads the guest's package database without root, matches it against feed "
                                   "files (Debian tracker JSON, debsecan feed, OSV dir/zip, Alpine secdb, kernel "
                                   "CNA records), and ranks findings by what runs in a Kata guest.")
    p.add_argument("target", metavar="IMAGE_OR_ROOTFS_DIR",
                   help="ext4 image, partitioned raw disk, erofs image, initrd, rootfs directory, "
                        "a dpkg status file, or a Kata tree or kata-static tarball (its image, kernel version "
                        "and config)")
    p.add_argument("--feed", action="append", required=True, metavar="FEED", help="feed file or directory (repeat)")
    p.add_argument("--sbom", metavar="FILE", help="write a CycloneDX 1.6 SBOM with the vulnerabilities to FILE")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the findings as JSON (or write them to FILE)")
    p.add_argument("--fail-on", choices=SEVERITIES, default=None,
                   help="exit 1 when a finding is ranked at or above this severity")
    p.add_argument("--suite", metavar="CODENAME",
                   help="the guest's release when the image has no os-release (e.g. bookworm, alpine:3.18)")
    p.add_argument("--kernel-version", metavar="X.Y.Z", help="guest kernel version for kernel CNA records")
    p.add_argument("--kernel-config", action="append", metavar="FILE",
                   help="guest kernel .config or Kata config fragments (repeat; later files win)")
    p.add_argument("--kbuild-map", metavar="FILE", help="source file -> Kconfig symbol map (default: shipped map)")
    p.add_argument("--trust", choices=("kata", "coco"), default="kata",
                   help="attacker model: kata (host trusted) or coco (confidential: host input parsers matter)")
    p.set_defaults(func=_scan)


def kata_tree_defaults(target: str) -> tuple[str, str | None, list[str]]:
    """A Kata tree (a dir holding opt/kata) as target: scan its guest image, with the kernel version from
    its versions.yaml and the kernel config it ships."""
    import yaml

    p = Path(target)
    if p.is_file() and p.name.endswith(BUNDLE_SUFFIXES):  # a kata-static tarball: scan what it ships

        p = open_bundle(p).root
        if _bundle_image(p) is None:
            raise KataError("the bundle ships no guest image (share/kata-containers/kata-containers*.img)",
                            path=target)
    image = _bundle_image(p) if p.is_dir() else None
    if image is None:
        return target, None, []
    kata = p / PREFIX if (p / PREFIX).is_dir() else p
    version = None
    try:
        data = yaml.safe_load((kata / "versions.yaml").read_text()) or {}
        version = ((data.get("assets") or {}).get("kernel") or {}).get("version")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    share = kata / "share/kata-containers"
    version = version or kernel_from_bundle_names(sorted(x.name for x in share.glob("vmlinu*")))
    configs = sorted(str(c) for c in share.glob("config-*"))[:1]
    return str(image), str(version) if version else None, configs


def _scan(args: argparse.Namespace) -> int:
    if args.sbom:
        check_output_file(args.sbom, "--sbom")
    if args.json not in (None, "-"):
        check_output_file(args.json, "--json")
    target, kernel_version, kernel_config = kata_tree_defaults(args.target)
    result = scan(target, args.feed, suite=args.suite, kernel_version=args.kernel_version or kernel_version,
                  kernel_config=args.kernel_config or kernel_config or None, kbuild_map=args.kbuild_map,
                  trust=args.trust)
    write_outputs(result, sbom=args.sbom, json_out=args.json if args.json not in (None, "-") else None)
    if args.json == "-":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_table(result))
        if args.sbom:
            print(f"SBOM written to {args.sbom}")
    if args.fail_on:
        over = result.at_or_above(args.fail_on)
        if over:
            print(f"{len(over)} finding(s) ranked {args.fail_on} or above", file=sys.stderr)
            return 1
    return 0
