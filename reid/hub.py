"""Pretrained weights a user can get: a known catalogue, fetched into the standard caches.

`reid-stream weights list | pull NAME | verify` is the command line over this module; the
stream itself never downloads (`reid.weights.load_ensemble` reads these caches, nothing more).

Where each file goes is where its own library looks for it, so the files also serve anyone
using torchvision or timm directly:

- torchvision's ImageNet trunks: ``<torch hub>/checkpoints/<file>`` (``torch.hub.get_dir()``,
  i.e. ``$TORCH_HOME/hub``), the file name carrying torchvision's hash prefix;
- Hugging Face repositories (MegaDescriptor, timm's DINOv2): the hub cache layout,
  ``<HF_HUB_CACHE>/models--ORG--NAME/snapshots/<rev>/<file>`` with ``refs/main`` naming
  ``<rev>``, so ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` finds it offline.

Verification, strongest first: a pinned sha256 where the publisher gives one, torchvision's
hash prefix (the first hex digits of the sha256, in the file name), else the sha256 recorded
at the first download (``<file>.sha256`` beside it) and checked from then on. Writes go to a
temporary file in the target folder, are verified, then renamed: an interrupted or refused
download leaves nothing behind under the final name.

The URL base is the publisher's (``https://download.pytorch.org``, ``https://huggingface.co``)
unless ``base_url`` replaces both: a mirror then serves ``models/<file>`` and
``ORG/NAME/resolve/main/<file>`` under it (the tests serve such a folder on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from reid.atomic_files import atomic_write

TORCH_BASE = "https://download.pytorch.org"
HF_BASE = "https://huggingface.co"
# The snapshot folder our pulls write; a real hub download writes the commit hash instead.
HF_REVISION = "main"
_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")
_CHUNK = 1 << 20


class HubError(RuntimeError):
    """A file that cannot be fetched or does not verify; the message is one line."""


@dataclass(frozen=True)
class HubFile:
    """One published file and where it belongs."""

    path: str  # under the publisher's base: "models/x.pth" or "ORG/NAME/resolve/main/f"
    cache: str  # "torch" | "hf"
    sha256: str = ""  # pinned by the publisher, when known

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def repo_id(self) -> str:
        """ORG/NAME of a Hugging Face file."""
        return "/".join(self.path.split("/")[:2])

    def hash_prefix(self) -> str:
        """torchvision's check: the file name's hex suffix is the start of its sha256."""
        found = _HASH_PREFIX.search(self.filename) if self.cache == "torch" else None
        return found.group(1) if found else ""

    def url(self, base_url: str | None = None) -> str:
        base = base_url or (TORCH_BASE if self.cache == "torch" else HF_BASE)
        return f"{base.rstrip('/')}/{self.path}"

    def destination(self, caches: Caches) -> Path:
        if self.cache == "torch":
            return caches.torch_hub / "checkpoints" / self.filename
        return caches.hf_repo(self.repo_id) / "snapshots" / HF_REVISION / self.filename


@dataclass(frozen=True)
class HubEntry:
    """A named set of files and the ensemble member(s) they feed (see reid.members)."""

    name: str
    files: tuple[HubFile, ...]
    members: tuple[str, ...]  # member names in reid.members.PRESETS
    description: str


@dataclass(frozen=True)
class Caches:
    torch_hub: Path  # torch.hub.get_dir()
    hf_hub: Path  # HF_HUB_CACHE

    @classmethod
    def default(cls) -> Caches:
        """The caches torchvision and timm read: $TORCH_HOME/hub and $HF_HUB_CACHE (or
        $HF_HOME/hub, ~/.cache/huggingface/hub)."""
        xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        torch_home = Path(os.environ.get("TORCH_HOME") or xdg / "torch")
        hf_home = Path(os.environ.get("HF_HOME") or xdg / "huggingface")
        hf_hub = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub")
        return cls(torch_home / "hub", hf_hub)

    def hf_repo(self, repo_id: str) -> Path:
        return self.hf_hub / ("models--" + repo_id.replace("/", "--"))


def _tv(filename: str) -> HubFile:
    return HubFile(f"models/{filename}", "torch")


def _hf(repo: str, *files: str) -> tuple[HubFile, ...]:
    return tuple(HubFile(f"{repo}/resolve/main/{f}", "hf") for f in files)


CATALOGUE: dict[str, HubEntry] = {
    e.name: e
    for e in (
        HubEntry(
            "imagenet",
            (_tv("resnet50-11ad3fa6.pth"), _tv("efficientnet_b0_rwightman-7f5810bc.pth")),
            ("msr50", "effb0"),
            "torchvision ImageNet ResNet50 (V2) and EfficientNet-B0: the default ensemble's trunks",
        ),
        HubEntry(
            "mobilenet_v2-imagenet",
            (_tv("mobilenet_v2-b0353104.pth"),),
            ("mobilenet_v2",),
            "torchvision ImageNet MobileNetV2",
        ),
        *(
            HubEntry(
                f"megadescriptor-{size.lower()}",
                _hf(f"BVRA/MegaDescriptor-{size}-{px}", "config.json", "pytorch_model.bin"),
                (f"megadescriptor-{size.lower()}",),
                f"MegaDescriptor-{size}-{px}: wildlife re-identification Swin ({px} px)",
            )
            for size, px in (("T", 224), ("S", 224), ("B", 224), ("L", 384))
        ),
        *(
            HubEntry(
                f"dinov2-{size}",
                _hf(f"timm/vit_{full}_patch14_dinov2.lvd142m", "config.json", "model.safetensors"),
                (f"dinov2-{size}",),
                f"DINOv2 ViT-{size.upper()}/14 (timm): self-supervised foundation features",
            )
            for size, full in (("s", "small"), ("b", "base"))
        ),
    )
}


@dataclass
class FileStatus:
    file: HubFile
    path: Path
    present: bool
    sha256: str = ""
    check: str = ""  # "pinned" | "hash-prefix" | "recorded" | "unrecorded"
    ok: bool | None = None  # None: not present
    problem: str = ""


def entry(name: str, catalogue: dict[str, HubEntry] | None = None) -> HubEntry:
    catalogue = CATALOGUE if catalogue is None else catalogue
    if name not in catalogue:
        raise HubError(f"unknown weights {name!r}; known: {', '.join(sorted(catalogue))}")
    return catalogue[name]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _expected(file: HubFile, path: Path) -> tuple[str, str]:
    """(kind of check, expected digest or prefix); ("unrecorded", "") when nothing is known."""
    if file.sha256:
        return "pinned", file.sha256
    if prefix := file.hash_prefix():
        return "hash-prefix", prefix
    record = _record_path(path)
    if record.is_file():
        return "recorded", record.read_text().split()[0]
    return "unrecorded", ""


def status(file: HubFile, caches: Caches) -> FileStatus:
    """Is the file present, and does its digest match what is known about it?"""
    path = file.destination(caches)
    if not path.is_file():
        return FileStatus(file, path, False)
    digest = file_sha256(path)
    check, want = _expected(file, path)
    ok = check == "unrecorded" or digest.startswith(want)
    problem = "" if ok else f"sha256 {digest[:16]}... does not match the {check} {want[:16]}..."
    return FileStatus(file, path, True, digest, check, ok, problem)


def verify(
    name: str, caches: Caches, catalogue: dict[str, HubEntry] | None = None
) -> list[FileStatus]:
    """Re-check the digests of an entry's files that are present."""
    return [status(f, caches) for f in entry(name, catalogue).files]


def pull(
    name: str,
    caches: Caches,
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout_s: float = 30.0,
    catalogue: dict[str, HubEntry] | None = None,
) -> list[FileStatus]:
    """Fetch an entry's files that are missing (present ones are verified, not fetched)."""
    out = []
    for file in entry(name, catalogue).files:
        current = status(file, caches)
        if current.present:
            if not current.ok:
                raise HubError(f"{current.path}: {current.problem}; delete it and pull again")
            out.append(current)
            continue
        download(file, current.path, base_url=base_url, progress=progress, timeout_s=timeout_s)
        if file.cache == "hf":
            _write_hf_ref(caches.hf_repo(file.repo_id))
        out.append(status(file, caches))
    return out


def download(
    file: HubFile,
    dest: Path,
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout_s: float = 30.0,
) -> str:
    """Fetch ``file`` to ``dest`` atomically and verify it; returns its sha256."""
    url = file.url(base_url)
    with atomic_write(dest, suffix=".part") as out:
        digest = _fetch(url, out, progress=progress, timeout_s=timeout_s, dest=dest, file=file)
        check, want = _expected(file, dest)
        if check != "unrecorded" and not digest.startswith(want):
            raise HubError(
                f"{url}: sha256 {digest[:16]}... does not match the {check} {want[:16]}...; "
                f"refused, nothing written to {dest}"
            )
    if not file.sha256:
        # Recorded at the first download, checked from then on (`verify`, later pulls).
        _write_text_atomically(_record_path(dest), f"{digest}  {dest.name}\n")
    return digest


def _fetch(url: str, out, *, progress: bool, timeout_s: float, dest: Path, file: HubFile) -> str:
    digest = hashlib.sha256()
    by_hand = (
        f"place {file.filename} (from {file.url()}) at {dest} by hand, then run "
        "`reid-stream weights verify`"
    )
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "reid-stream"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=file.filename,
                disable=not (progress and sys.stderr.isatty()),
            )  # fmt: skip
            with bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise HubError(f"cannot download {url}: HTTP {exc.code}; {by_hand}") from exc
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HubError(f"cannot download {url} ({reason}); {by_hand}") from exc
    if total is not None and received != total:
        raise HubError(f"download of {url} stopped at {received} of {total} bytes; {by_hand}")
    return digest.hexdigest()


def _write_hf_ref(repo_dir: Path) -> None:
    # huggingface_hub resolves revision "main" through refs/main to a snapshot folder.
    ref = repo_dir / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.is_file():
        _write_text_atomically(ref, HF_REVISION)


def _write_text_atomically(path: Path, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def local_file(member_file: str, caches: Caches | None = None) -> Path | None:
    """The cached path of a catalogue file named by its file name, if present and verified
    (what the stream's "local cache" step of its resolution reads)."""
    caches = caches or Caches.default()
    for e in CATALOGUE.values():
        for f in e.files:
            if f.filename == member_file or f.path == member_file:
                found = status(f, caches)
                if found.present and found.ok:
                    return found.path
    return None


def names(catalogue: dict[str, HubEntry] | None = None) -> Iterable[str]:
    return sorted(CATALOGUE if catalogue is None else catalogue)
