"""``pytest-kata hosts``: boot a staging host by hand, and list the hosts runs have on a libvirt.

    pytest-kata hosts boot [--uri URI] [--accel auto|kvm|tcg] [--image FILE]   # boots, waits for Enter
    pytest-kata hosts list [--uri URI]                                          # pytest-kata domains
"""

from __future__ import annotations

import argparse

from pytest_kata import runid, services
from pytest_kata.hosts.libvirt import connect, domain_run_id
from pytest_kata.hosts.provision import HostPool, PoolSettings
from pytest_kata.resources import LOCAL_LIBVIRT_URI, cache_dir
from pytest_kata.sweep import sweep


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hosts", help="boot a staging host by hand, or list pytest-kata hosts on a libvirt")
    hsub = p.add_subparsers(dest="hosts_command", metavar="ACTION")
    b = hsub.add_parser("boot", help="boot one host from the host image and keep it until Enter (or Ctrl-C)")
    b.add_argument("--uri", default=LOCAL_LIBVIRT_URI, help=f"libvirt URI (default: {LOCAL_LIBVIRT_URI})")
    b.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"))
    b.add_argument("--image", help="prebuilt host image (default: build/reuse vm-images/host)")
    b.add_argument("--boot-timeout", type=float, default=240.0)
    b.set_defaults(func=_boot)
    ls = hsub.add_parser("list", help="list pytest-kata domains (run id, whether that run is alive)")
    ls.add_argument("--uri", default=LOCAL_LIBVIRT_URI)
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _boot(args: argparse.Namespace) -> int:
    run_id = runid.current_run_id()
    daemon = services.ensure_libvirtd(run_id, uri=args.uri)
    pool = HostPool(PoolSettings(uri=args.uri, accel=args.accel, host_image=args.image,
                                 boot_timeout=args.boot_timeout,
                                 log_dir=cache_dir() / "runs" / run_id / "logs"))  # swept at the end
    try:
        host = pool.boot()
        print(f"{host.name} is up ({pool.describe()}); console: virsh -c {args.uri} console {host.name}")
        print(host.run("uname -a; systemctl is-system-running").stdout.strip())
        try:
            input("press Enter to destroy it ... ")
        except (EOFError, KeyboardInterrupt):
            print()
    finally:
        pool.close()
        sweep(dead_only=False, run_id=run_id)  # the run's scratch and state directories
        daemon.stop()
        runid.unregister(run_id)
    return 0


def _list(args: argparse.Namespace) -> int:
    conn = connect(args.uri, "--uri")
    try:
        rows = []
        for dom in conn.listAllDomains(0):
            rid = domain_run_id(dom)
            if rid:
                state = "running" if dom.isActive() else "stopped"
                rows.append((dom.name(), state, rid, "alive" if runid.is_alive(rid) else "dead (sweep removes it)"))
    finally:
        conn.close()
    if not rows:
        print(f"no pytest-kata hosts on {args.uri}")
    for name, state, rid, alive in rows:
        print(f"{name:<32} {state:<8} run {rid} {alive}")
    return 0
