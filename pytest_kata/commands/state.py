"""``pytest-kata state``: what an install may touch on a host — the Kata prefix and releases (sha256, mode,
owner, symlink targets), the containerd configuration and drop-ins, the runtime handlers — and its digest.
"""

from __future__ import annotations

import argparse
import json

from pytest_kata.commands._hostargs import add_host_arguments
from pytest_kata.errors import KataError
from pytest_kata.hosts.resolve import check_sysroot, resolve_host
from pytest_kata.install.containerd import containerd_for
from pytest_kata.install.state import State, capture_state, diff_states


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("state", help="print the install-relevant state of a host and its digest")
    p.add_argument("--files", action="store_true", help="list every captured path")
    p.add_argument("--compare", metavar="STATE_JSON", help="show the difference from a saved `state --json`")
    add_host_arguments(p)
    p.set_defaults(func=_state)


def _state(args: argparse.Namespace) -> int:
    host = resolve_host(args.host)
    try:
        check_sysroot(host, args.sysroot)
    except KataError:
        host.close()
        raise
    mode = args.containerd
    if mode == "auto":
        mode = "none" if str(args.sysroot).rstrip("/") else "systemd"
    containerd = containerd_for(mode, args.sysroot, host)
    try:
        state = capture_state(host, str(args.sysroot), containerd=containerd)
    finally:
        stop = getattr(containerd, "stop", None)
        if stop is not None:
            stop()
        host.close()  # ends an SSH control connection at once instead of at its idle limit
    if args.compare:
        try:
            with open(args.compare, encoding="utf-8") as fh:
                saved = State.from_json(json.load(fh))
        except (OSError, ValueError, TypeError) as exc:
            raise KataError(f"cannot read a saved state: {exc}", path=args.compare) from None
        diff = diff_states(saved, state)
        print(f"digest saved {saved.digest[:16]}, now {state.digest[:16]}: "
              + ("EQUAL" if diff.equal else "DIFFERENT"))
        for line in diff.lines():
            print(f"  {line}")
        return 0 if diff.equal else 1
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    counts = state.counts()
    print(f"host {state.host} sysroot {state.sysroot}")
    print(f"digest   {state.digest}")
    print(f"release  {state.release or '(no /opt/kata symlink)'}")
    print("entries  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) if counts else "entries  none")
    print(f"handlers ({state.handlers_source}):")
    for name, spec in sorted(state.handlers.items()):
        print(f"  {name}: {spec.get('runtime_type', '?')} {spec.get('runtime_path', '')}")
    print("containerd files: " + (", ".join(sorted(state.configs)) or "none"))
    if args.files:
        for path, entry in sorted(state.entries.items()):
            print(f"  {path}: {entry.describe()}")
    return 0
