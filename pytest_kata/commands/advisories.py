"""``pytest-kata advisories``: the advisory gate, release-announcement monitoring, and feed refresh.

Exit status (so that a pipeline can act on it without parsing output):

* version/bundle check: 0 not affected by any advisory, 1 affected (or an advisory cannot be decided), 2 bad
  input (one line on stderr);
* ``--atom``: 0 no newer release, 1 a newer release (or, without ``--current``, any release) has a security
  section, 3 a newer release without security content, 2 bad input;
* ``refresh``: 0 written, 2 bad input (the shipped feed is left untouched).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pytest_kata import bundle as bundle_lib
from pytest_kata.advisories import (
    DEFAULT_FEED,
    RELEASES_ATOM,
    Advisory,
    BuildVersion,
    Deployment,
    ReleaseVersion,
    advisory_from_record,
    decide_build,
    full_release_problem,
    load_backports,
    load_feed,
    load_releases,
    merge_feed,
    normalise_release,
    watch_releases,
)
from pytest_kata.errors import FeedError, KataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "advisories", help="is a Kata release affected by known advisories? (also --atom, refresh)",
        description="Check a Kata release (--version) or a bundle (--bundle) against OSV advisories; exit 1 "
                    "when affected. With --atom, watch a GitHub releases feed for newer or security "
                    "releases. "
                    "Without either, list the feed.",
        epilog="exit status: 0 not affected / nothing new; 1 affected / a security release to act on; "
               "2 bad input; 3 (--atom) a newer release without security content. "
               f"Refresh the shipped feed: pytest-kata advisories refresh --from PATH_OR_URL "
               f"(writes {DEFAULT_FEED}).")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--version", dest="release", metavar="V", help="a Kata release number, e.g. 3.27.0")
    what.add_argument("--bundle", action="append", metavar="B",
                      help="a candidate bundle (tarball or /opt/kata tree); repeat for split tarballs")
    what.add_argument("--atom", metavar="FILE|URL", nargs="?", const=RELEASES_ATOM,
                      help=f"a GitHub releases Atom feed (default URL: {RELEASES_ATOM})")
    p.add_argument("--current", metavar="V", help="with --atom: the installed release")
    p.add_argument("--prereleases", action="store_true",
                   help="with --atom: count -rc/-alpha tags as releases")
    p.add_argument("--feed", action="append", metavar="F",
                   help="OSV feed: a JSON file (object or array), a directory tree (e.g. a GitHub "
                        "advisory-database checkout), a .zip dump, or a URL; repeatable "
                        "(default: the shipped feed)")
    p.add_argument("--repo", metavar="PATH",
                   help="a kata-containers git clone: decides commit builds (pseudo-version or git describe "
                        "--version) by whether the fix commit is an ancestor")
    p.add_argument("--backports", metavar="FILE",
                   help="vendor builds (e.g. --version 3.19.1.kata2): TOML [backports] table of advisory id = "
                        "the backported fix")
    p.add_argument("--all", action="store_true",
                   help="also print the advisories that do not affect the release")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_main)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    r = actions.add_parser("refresh", help="validate a feed and install it as the default feed",
                           description="Reads an OSV feed (file, directory tree, zip or URL), validates "
                                       "every record, and writes the Kata records as one JSON array "
                                       "(atomically).")
    r.add_argument("--from", dest="source", required=True, action="append", metavar="PATH_OR_URL")
    r.add_argument("--to", dest="target", default=str(DEFAULT_FEED), metavar="FILE",
                   help=f"where to write (default: the shipped feed {DEFAULT_FEED})")
    r.add_argument("--dry-run", action="store_true", help="validate and show the changes, write nothing")
    r.add_argument("--replace", action="store_true",
                   help="replace the feed with the source instead of merging the source into it")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_refresh)


def _main(args: argparse.Namespace) -> int:
    if args.atom:
        return _atom(args)
    if args.current or args.prereleases:
        raise KataError("--current/--prereleases only go with --atom")
    advisories = load_feed(args.feed)
    deployment = None
    if args.bundle:
        version, where = _bundle_version(args.bundle), ", ".join(args.bundle)
        deployment = _bundle_deployment(args.bundle)
    elif args.release:
        version, where = args.release, None
    else:
        return _list(advisories, args)
    build = BuildVersion.parse(version)
    if build is None:
        raise FeedError(f"{version!r} is not a Kata release number (expected X.Y.Z, e.g. 3.27.0), Go "
                        "pseudo-version, git describe output or vendor build (3.19.1.kata2)", path=where)
    problem = full_release_problem(version) if build.kind == "release" else None
    if problem:
        raise FeedError(f"{version!r} {problem} (expected X.Y.Z, e.g. 3.27.0)", path=where)
    backports = load_backports(args.backports) if args.backports else {}
    decisions = [decide_build(a, version, repo=args.repo, backports=backports, deployment=deployment,
                              backports_file=args.backports) for a in advisories]
    affected = [d for d in decisions if d.affected and d.applicable]
    undecided = [d for d in decisions if d.undecided and d.applicable]
    if args.json:
        shown = decisions if args.all else affected + undecided
        print(json.dumps({"version": normalise_release(version), "bundle": where,
                          "feed": _feed_names(args.feed), "advisories": len(decisions),
                          "affected": len(affected), "undecided": len(undecided),
                          "upgrade_to": _upgrade_to(affected), "decisions": [d.to_json() for d in shown]},
                         indent=2))
        return 1 if affected or undecided else 0
    subject = f"{where} (release {normalise_release(version)})" if where else normalise_release(version)
    inapplicable = sum(1 for d in decisions if not d.applicable)
    scoped = f"; {inapplicable} not applicable to what it ships or can run" + ("" if args.all else
                                                                              ": --all shows why")
    scoped = scoped if inapplicable else ""
    if affected:
        print(f"{subject}: AFFECTED by {len(affected)} of {len(decisions)} advisories{scoped}")
    else:
        print(f"{subject}: not affected by any of {len(decisions)} advisories"
              + (f" ({len(undecided)} cannot be decided)" if undecided else "") + scoped)
    clean = [d for d in decisions if not d.affected and not d.undecided]
    rows = affected + undecided + (clean if args.all else [])
    if rows:
        print(f"  {'severity':<9} {'advisory':<20} {'fixed in':<9} summary")
    for d in rows:
        state = "" if d.affected else ("[cannot decide] " if d.undecided else "[not affected] ")
        state = state if d.applicable else "[not applicable] "
        print(f"  {d.advisory.severity:<9} {d.advisory.id:<20} {d.fixed or '?':<9} {state}{d.advisory.title}")
        print(f"  {'':<9} decided by: {d.evidence}")
    upgrade = _upgrade_to(affected)
    if upgrade:
        print(f"upgrade to {upgrade} or later (the first release that carries every fix)")
    print(f"feed: {_feed_names(args.feed)}")
    return 1 if affected or undecided else 0


def _bundle_deployment(paths: list[str]) -> Deployment | None:
    """The bundle's configurations (for scoping advisories to what it ships)."""
    return Deployment.from_bundle(bundle_lib.open_bundle(paths))


def _feed_names(feeds: list[str] | None) -> str:
    return ", ".join(feeds) if feeds else str(DEFAULT_FEED)


def _upgrade_to(affected: list[Any]) -> str | None:
    fixes = [ReleaseVersion.parse(d.fixed) for d in affected if d.fixed]
    known = [f for f in fixes if f is not None]
    if not known or len(known) < len(affected):
        return None
    return str(max(known))


def _bundle_version(paths: list[str]) -> str:
    """The bundle's release number, cheaply (identify) or from the full inventory."""
    info: dict[str, Any] = {}
    try:
        info = bundle_lib.identify(paths if len(paths) > 1 else paths[0])
    except NotImplementedError:
        info = {}
    version = info.get("version")
    if not version:
        try:
            version = getattr(bundle_lib.open_bundle(paths), "version", None)
        except NotImplementedError:
            version = None
    if not version:
        raise KataError("cannot tell the Kata release of this bundle (no VERSION or versions.yaml); "
                        "pass --version X.Y.Z instead", path=", ".join(paths))
    return str(version)


def _list(advisories: list[Advisory], args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([a.to_json() for a in advisories], indent=2))
        return 0
    print(f"{len(advisories)} advisories in {_feed_names(args.feed)}")
    for a in advisories:
        print(f"  {a.severity:<9} {a.id:<20} fixed in {a.fixed_in or '?':<13} {a.title}")
    return 0


def _atom(args: argparse.Namespace) -> int:
    releases = load_releases(args.atom)
    known: list[str] = []
    for advisory in load_feed(args.feed):
        known += [advisory.id, *advisory.aliases]
    watch = watch_releases(releases, args.current, known_ids=known, include_prereleases=args.prereleases)
    if args.json:
        print(json.dumps({"feed": args.atom, "releases": len(releases), **watch.to_json()}, indent=2))
        return watch.exit_status
    latest = next((r for r in releases if r.version and not r.version.is_prerelease), None)
    print(f"{args.atom}: {len(releases)} releases, latest {latest.tag if latest else '?'}"
          + (f"; installed {args.current}" if args.current else ""))
    if args.current:
        if watch.newer:
            print(f"NEWER RELEASES than {args.current}: " + ", ".join(r.tag for r in watch.newer))
        else:
            print(f"{args.current} is the newest release in the feed")
    for r in watch.security:
        why = ", ".join(r.security_ids) or "a Security heading"
        print(f"SECURITY {r.tag} ({r.updated}): {why}  {r.url}")
    if watch.unknown_ids:
        print("not in the advisory feed (refresh it): " + ", ".join(watch.unknown_ids))
    return watch.exit_status


def _refresh(args: argparse.Namespace) -> int:
    advisories = load_feed(args.source)
    if not advisories:
        raise FeedError("no advisories found; refusing to replace the feed with an empty one",
                        path=", ".join(args.source))
    target = Path(args.target)
    existing: list[Advisory] = []
    if target.is_file():
        try:
            existing = load_feed([target])
        except FeedError:
            existing = []
    before = {a.id: a.raw for a in existing}
    incoming = [a.raw for a in advisories]
    records = sorted(incoming, key=lambda r: r["id"]) if args.replace else merge_feed(list(before.values()),
                                                                                        incoming)
    after = {r["id"]: r for r in records}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(i for i in set(after) & set(before) if after[i] != before[i])
    kept = sorted(set(before) - {a.id for a in advisories} - set(removed))
    no_enumeration = [i for i, r in after.items()
                      if not any(e.get("versions") for e in r.get("affected") or [])
                      and not advisory_from_record(r).first_release_with_fix]
    summary = {"source": args.source, "target": str(target), "advisories": len(records), "added": added,
               "removed": removed, "changed": changed, "kept": kept, "without_versions_list": no_enumeration,
               "written": not args.dry_run}
    if not args.dry_run:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(target)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    verb = "would write" if args.dry_run else "wrote"
    print(f"{verb} {len(records)} advisories to {target}: {len(added)} added, {len(removed)} removed, "
          f"{len(changed)} changed, {len(kept)} kept")
    for label, ids in (("added", added), ("removed", removed), ("changed", changed)):
        if ids:
            print(f"  {label}: {', '.join(ids)}")
    if no_enumeration:
        print("  note: no affected[].versions list (only ranges are used; Go pseudo-version ranges cannot "
              "decide a release): " + ", ".join(no_enumeration), file=sys.stderr)
    return 0
