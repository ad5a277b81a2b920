"""reid.hub: pulls from an HTTP server on 127.0.0.1 (no internet), atomic and verified."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from reid.hub import CATALOGUE, Caches, HubEntry, HubError, HubFile, pull, status, verify
from tests.http_mirror import publish, serve


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "mirror"
    with serve(root) as base:
        yield base, root


def _caches(tmp_path: Path) -> Caches:
    return Caches(tmp_path / "torch" / "hub", tmp_path / "hf" / "hub")


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_pull_hf_file_records_digest_then_verifies(server, tmp_path: Path) -> None:
    base, root = server
    data = b"foundation weights" * 1000
    digest = publish(root, "ORG/model/resolve/main/model.safetensors", data)
    cat = {"m": HubEntry("m", (HubFile("ORG/model/resolve/main/model.safetensors", "hf"),),
                         ("dinov2-s",), "test")}  # fmt: skip
    caches = _caches(tmp_path)
    (got,) = pull("m", caches, base_url=base, progress=False, catalogue=cat)
    want = caches.hf_hub / "models--ORG--model" / "snapshots" / "main" / "model.safetensors"
    assert got.path == want and want.read_bytes() == data
    assert got.sha256 == digest and got.check == "recorded" and got.ok
    # The Hugging Face layout: refs/main names the snapshot, as huggingface_hub resolves it.
    assert (caches.hf_hub / "models--ORG--model" / "refs" / "main").read_text() == "main"
    # Checked from then on: a changed file no longer verifies.
    want.write_bytes(data[:-1] + b"X")
    (checked,) = verify("m", caches, cat)
    assert not checked.ok and "does not match the recorded" in checked.problem
    with pytest.raises(HubError, match="delete it and pull again"):
        pull("m", caches, base_url=base, progress=False, catalogue=cat)


def test_pinned_digest_mismatch_is_refused_and_nothing_is_written(server, tmp_path: Path) -> None:
    base, root = server
    publish(root, "models/thing.pth", b"not what was pinned")
    file = HubFile("models/thing.pth", "torch", sha256="ab" * 32)
    cat = {"t": HubEntry("t", (file,), ("msr50",), "test")}
    caches = _caches(tmp_path)
    with pytest.raises(HubError, match="does not match the pinned"):
        pull("t", caches, base_url=base, progress=False, catalogue=cat)
    assert _leftovers(caches.torch_hub) == []


def test_torchvision_hash_prefix_is_checked(server, tmp_path: Path) -> None:
    base, root = server
    data = b"imagenet trunk"
    prefix = hashlib.sha256(data).hexdigest()[:8]
    publish(root, f"models/trunk-{prefix}.pth", data)
    publish(root, "models/trunk-00000000.pth", data)
    caches = _caches(tmp_path)
    good = {"g": HubEntry("g", (HubFile(f"models/trunk-{prefix}.pth", "torch"),), (), "t")}
    (got,) = pull("g", caches, base_url=base, progress=False, catalogue=good)
    assert got.check == "hash-prefix" and got.ok
    assert got.path == caches.torch_hub / "checkpoints" / f"trunk-{prefix}.pth"
    bad = {"b": HubEntry("b", (HubFile("models/trunk-00000000.pth", "torch"),), (), "t")}
    with pytest.raises(HubError, match="hash-prefix"):
        pull("b", caches, base_url=base, progress=False, catalogue=bad)
    assert not (caches.torch_hub / "checkpoints" / "trunk-00000000.pth").exists()


def test_interrupted_download_leaves_no_partial_file(server, tmp_path: Path) -> None:
    base, root = server
    publish(root, "models/big.pth", bytes(range(256)) * 4096)
    cat = {"c": HubEntry("c", (HubFile("models/big.pth", "torch"),), (), "t")}
    caches = _caches(tmp_path)
    with pytest.raises(HubError, match=r"stopped at|cannot download"):
        pull("c", caches, base_url=f"{base}/cut", progress=False, catalogue=cat)
    assert _leftovers(caches.torch_hub) == []
    assert not status(cat["c"].files[0], caches).present


def test_without_network_one_line_says_what_to_place_where(tmp_path: Path) -> None:
    caches = _caches(tmp_path)
    with pytest.raises(HubError) as err:
        # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        pull("imagenet", caches, base_url="http://127.0.0.1:9", progress=False, timeout_s=5)
    message = str(err.value)
    assert "\n" not in message
    dest = caches.torch_hub / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert str(dest) in message and "https://download.pytorch.org/models/resnet50" in message
    assert _leftovers(caches.torch_hub) == []


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(HubError, match="megadescriptor-t"):
        pull("nope", _caches(tmp_path), progress=False)


def test_catalogue_names_files_where_their_libraries_look() -> None:
    imagenet = CATALOGUE["imagenet"]
    assert [f.hash_prefix() for f in imagenet.files] == ["11ad3fa6", "7f5810bc"]
    mega = CATALOGUE["megadescriptor-l"]
    assert {f.repo_id for f in mega.files} == {"BVRA/MegaDescriptor-L-384"}
    assert mega.files[-1].url() == (
        "https://huggingface.co/BVRA/MegaDescriptor-L-384/resolve/main/pytorch_model.bin"
    )


def test_the_streams_resolution_never_touches_the_network(tmp_path: Path, monkeypatch) -> None:
    import logging
    import socket

    from reid.weights import load_ensemble

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stream's weights resolution opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("reid.weights").addHandler(handler)
    try:
        # An empty cache: checkpoint (none) -> local cache (empty) -> seeded, said loudly.
        loaded = load_ensemble(None, hub_dir=tmp_path / "empty-hub", input_size=32)
    finally:
        logging.getLogger("reid.weights").removeHandler(handler)
    assert loaded.source == "seeded"
    assert any("NO TRAINED WEIGHTS" in r.getMessage() for r in records)
    assert any("weights pull imagenet" in r.getMessage() for r in records)
