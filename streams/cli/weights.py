"""`reid-stream weights list | pull NAME | verify | checkpoint`: pretrained weights a user
can get (the catalogue and the caches are described in reid/hub.py). `reid-stream run` never
downloads: it reads what `pull` put in the caches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streams.cli.common import settings_from


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="list, pull and verify pretrained weights; write a checkpoint from them",
        description="Pretrained weights: the known set (torchvision ImageNet trunks, "
        "MegaDescriptor, DINOv2) in the torch hub and Hugging Face caches.",
        # Every command's --help ends with an example (tests/unit/test_streams_cli.py).
        epilog="examples:\n  reid-stream weights list\n  reid-stream weights pull imagenet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wsub = p.add_subparsers(dest="weights_command", required=True)
    c = wsub.add_parser("list", help="what is known, what is present, digests, versions")
    c.add_argument("--json", action="store_true", help="one JSON object per entry")
    c.set_defaults(func=cmd_list)
    c = wsub.add_parser("pull", help="download a known set into the caches (verified)")
    c.add_argument("names", nargs="+", metavar="NAME", help="see `reid-stream weights list`")
    c.add_argument(
        "--base-url", default=None, help="a mirror of the publishers (REID_WEIGHTS_BASE_URL)"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_pull)
    c = wsub.add_parser("verify", help="re-check the digests of the files present")
    c.add_argument("names", nargs="*", metavar="NAME", help="default: every entry")
    c.set_defaults(func=cmd_verify)
    c = wsub.add_parser(
        "checkpoint",
        help="write a stream checkpoint from pretrained members (one member serves as both)",
    )
    c.add_argument(
        "members", nargs="+", metavar="MEMBER[=FILE]",
        help="one or two members (reid/members.py presets, e.g. megadescriptor-t, dinov2-s, "
        "mobilenet_v2, efficientnet_lite0); FILE defaults to the pulled file",
    )  # fmt: skip
    c.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    c.add_argument("--input-size", default=None, help="H or HxW for every member (e.g. 192x384)")
    c.add_argument("--fit", choices=("squash", "pad"), default=None, help="resize rule")
    c.set_defaults(func=cmd_checkpoint)


def cmd_list(args: argparse.Namespace) -> int:
    from reid.hub import CATALOGUE, Caches, status

    settings_from(args)
    caches = Caches.default()
    for entry in CATALOGUE.values():
        files = [status(f, caches) for f in entry.files]
        present = all(f.present for f in files)
        row = {
            "name": entry.name,
            "present": present,
            "members": list(entry.members),
            "files": [
                {
                    "path": str(f.path),
                    "present": f.present,
                    "sha256": f.sha256 or None,
                    "check": f.check or None,
                    "ok": f.ok,
                }
                for f in files
            ],
            "embedding_version": _version(entry.name) if present else None,
            "description": entry.description,
        }
        if args.json:
            print(json.dumps(row, sort_keys=True))
            continue
        mark = "present" if present else "missing"
        print(f"{entry.name:<22} {mark:<8} {row['embedding_version'] or '-':<44} "
              f"{entry.description}")  # fmt: skip
        for f in files:
            digest = (
                f"{f.sha256[:16]} ({f.check}{'' if f.ok else ', MISMATCH'})" if f.present else "-"
            )
            print(f"    {f.path}  {digest}")
    return 0


def _version(name: str) -> str | None:
    """The embedding version the entry gives: the stream's own for `imagenet` (the default
    members over the cached trunks), else that of `weights checkpoint <member>`."""
    from reid.hub import Caches, entry, local_file
    from reid.members import PRESETS
    from reid.trunk_weights import pretrained_version
    from reid.weights import cached_imagenet_trunks, imagenet_version

    found = entry(name)
    if name == "imagenet":
        trunks = cached_imagenet_trunks(Caches.default().torch_hub)
        return imagenet_version(*trunks) if trunks else None
    members = []
    for member in found.members:
        spec = PRESETS[member]
        path = local_file(spec.weights)
        if path is None:
            return None
        members.append((spec, path))
    return pretrained_version(members)


def cmd_pull(args: argparse.Namespace) -> int:
    from reid.hub import Caches, HubError, pull

    settings = settings_from(args)
    base_url = args.base_url or settings.weights_base_url
    caches = Caches.default()
    try:
        for name in args.names:
            for f in pull(name, caches, base_url=base_url, progress=not args.no_progress):
                print(f"{name}: {f.path} sha256 {f.sha256[:16]} ({f.check})")
            version = _version(name)
            if version:
                print(f"{name}: embedding_version {version}")
    except HubError as err:
        print(f"reid-stream weights pull: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reid.hub import CATALOGUE, Caches, HubError, verify

    settings_from(args)
    caches = Caches.default()
    bad = checked = 0
    try:
        for name in args.names or list(CATALOGUE):
            for f in verify(name, caches):
                if not f.present:
                    continue
                checked += 1
                state = "ok" if f.ok else f"MISMATCH: {f.problem}"
                bad += not f.ok
                print(f"{name}: {f.path} {f.check} {state}")
    except HubError as err:
        print(f"reid-stream weights verify: {err}", file=sys.stderr)
        return 2
    print(f"{checked} file(s) checked, {bad} mismatch(es)")
    return 1 if bad else 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from reid.checkpoints import members_preprocess, save_checkpoint
    from reid.hub import local_file
    from reid.members import member_spec
    from reid.trunk_weights import pretrained_ensemble

    settings_from(args)
    if len(args.members) > 2:
        print("reid-stream weights checkpoint: an ensemble has two members", file=sys.stderr)
        return 2
    members = []
    try:
        for item in args.members:
            name, _, file = item.partition("=")
            spec = member_spec(name)
            if args.input_size or args.fit:
                spec = spec.with_input(_size(args.input_size) or spec.input_size, args.fit)
            path = Path(file) if file else local_file(spec.weights) if spec.weights else None
            if path is None:
                raise ValueError(
                    f"no local weights for {name}: pull them first or give {name}=FILE"
                )
            members.append((spec, path))
        model, version = pretrained_ensemble(members)
    except ValueError as err:
        print(f"reid-stream weights checkpoint: {err}", file=sys.stderr)
        return 2
    specs = [spec for spec, _ in members]
    if len(specs) == 1:
        specs = specs * 2
    preprocess = members_preprocess(specs)
    meta = {"members_from": {s.name: str(p) for s, p in members}}
    save_checkpoint(args.out, model, embedding_version=version, preprocess=preprocess,
                    meta=meta, members=specs)  # fmt: skip
    print(f"{args.out} {version}")
    return 0


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)
