import os

import pytest

from streams.events import InvalidEvent
from streams.images import ImageRoots
from streams.settings import load_settings


@pytest.fixture()
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "cam1").mkdir(parents=True)
    (root / "cam1" / "a.jpg").write_bytes(b"jpeg")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "cam1" / "link.jpg")
    return ImageRoots([root], wait_s=0), root


def reason(roots, uri):
    with pytest.raises(InvalidEvent) as info:
        roots.read(uri)
    return info.value.reason


def test_relative_absolute_and_file_uris_inside_the_root(roots):
    r, root = roots
    assert r.read("cam1/a.jpg") == b"jpeg"
    assert r.read(str(root / "cam1" / "a.jpg")) == b"jpeg"
    assert r.read((root / "cam1" / "a.jpg").as_uri()) == b"jpeg"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("../secret.jpg", "image_uri_forbidden"),
        ("cam1/../../secret.jpg", "image_uri_forbidden"),
        ("/etc/passwd", "image_uri_forbidden"),
        ("cam1/link.jpg", "image_uri_forbidden"),
        ("http://example.org/a.jpg", "image_uri_remote"),
        ("s3://bucket/a.jpg", "image_uri_remote"),
        ("file://otherhost/a.jpg", "image_uri_remote"),
        ("cam1/missing.jpg", "image_not_found"),
        ("cam1", "image_not_found"),
        ("a\x00b", "image_uri_forbidden"),
    ],
)
def test_uris_escaping_the_root_are_refused(roots, uri, expected):
    assert reason(roots[0], uri) == expected


def test_no_roots_means_no_files():
    assert reason(ImageRoots([]), "a.jpg") == "image_uri_forbidden"


def test_settings_from_environment_and_file(tmp_path, monkeypatch):
    file = tmp_path / "reid.env"
    file.write_text("REID_BATCH_MAX_SIZE=16\nREID_THRESHOLD=0.5\n")
    monkeypatch.setenv("REID_THRESHOLD", "0.45")
    monkeypatch.setenv("REID_KAFKA_OPTIONS", '{"security.protocol": "SASL_SSL"}')
    monkeypatch.setenv("REID_KAFKA_PASSWORD", "hunter2")
    s = load_settings(file)
    assert s.batch_max_size == 16  # from the file
    assert s.threshold == 0.45  # the environment wins
    assert s.kafka_common()["security.protocol"] == "SASL_SSL"
    assert s.kafka_common()["sasl.password"] == "hunter2"
    assert "hunter2" not in repr(s)


def test_settings_reject_wrong_values(monkeypatch):
    monkeypatch.setenv("REID_BATCH_MAX_SIZE", "0")
    with pytest.raises(ValueError, match="batch_max_size"):
        load_settings()
    monkeypatch.delenv("REID_BATCH_MAX_SIZE")
    with pytest.raises(ValueError, match="weight_resnet"):
        load_settings(weight_resnet=0.7)


def test_empty_redis_url_disables_the_cache(monkeypatch):
    monkeypatch.setenv("REID_REDIS_URL", "")
    assert load_settings().redis_url is None


def test_secrets_come_from_files_and_stay_out_of_repr(tmp_path, monkeypatch):
    (tmp_path / "reid_database_url").write_text("postgresql://reid:s3cret-pw@db:5432/reid")
    (tmp_path / "reid_kafka_password").write_text("kafka-pw")
    monkeypatch.setenv("REID_SECRETS_DIR", str(tmp_path))
    s = load_settings()
    assert s.database_url.get_secret_value().endswith("@db:5432/reid")
    assert s.kafka_common()["sasl.password"] == "kafka-pw"
    assert "s3cret-pw" not in repr(s) and "kafka-pw" not in str(s)


# -- thumbnails (docs/curation.md) ----------------------------------------------------------
def _photo(width: int, height: int, seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_thumbnail_keeps_the_aspect_and_its_size_bound():
    import io

    from PIL import Image

    from reid.preprocess import decode_image
    from streams.images import ThumbnailSpec, thumbnail_jpeg

    image = decode_image(_photo(800, 400))
    thumb = thumbnail_jpeg(image, ThumbnailSpec(128, 16_384))
    with Image.open(io.BytesIO(thumb)) as small:
        assert small.format == "JPEG" and small.size == (128, 64)
    tiny = decode_image(_photo(40, 30))
    with Image.open(io.BytesIO(thumbnail_jpeg(tiny, ThumbnailSpec(128, 16_384)))) as small:
        assert small.size == (40, 30)  # never enlarged
    # Noise compresses badly: at a bound it cannot meet, no thumbnail rather than a big one.
    assert thumbnail_jpeg(decode_image(_photo(800, 800)), ThumbnailSpec(512, 1_024)) is None
    assert len(thumbnail_jpeg(image, ThumbnailSpec(128, 16_384))) <= 16_384


def test_crop_with_thumbnail_and_the_gpu_path_thumbnail():
    import base64
    import io

    from PIL import Image

    from reid.preprocess import Preprocess
    from streams.events import parse_detection
    from streams.images import (
        ImageRoots,
        ThumbnailSpec,
        crop_with_thumbnail,
        thumbnail_from_bytes,
    )

    data = _photo(600, 300, seed=1)
    doc = {"schema": 1, "detection_id": "d", "camera_id": "c",
           "captured_at": "2026-11-02T05:31:12Z", "bbox": [100, 50, 400, 250],
           "image_b64": base64.b64encode(data).decode()}  # fmt: skip
    event = parse_detection(__import__("json").dumps(doc).encode(), max_bytes=10**7)
    spec = ThumbnailSpec(128, 16_384)
    pixels, thumb = crop_with_thumbnail(event, ImageRoots([]), Preprocess((64, 64)),
                                        max_pixels=10**7, thumbnail=spec)  # fmt: skip
    assert tuple(pixels.shape) == (3, 64, 64)
    with Image.open(io.BytesIO(thumb)) as small:
        assert small.size == (128, 85)  # the 300 x 200 box
    assert crop_with_thumbnail(event, ImageRoots([]), Preprocess((64, 64)),
                               max_pixels=10**7)[1] is None  # fmt: skip
    drafted = thumbnail_from_bytes(data, event.bbox, spec, max_pixels=10**7)
    with Image.open(io.BytesIO(drafted)) as small:
        assert small.size == (128, 85)
    assert thumbnail_from_bytes(b"not an image", None, spec, max_pixels=10**7) is None
    tga = io.BytesIO()
    Image.open(io.BytesIO(data)).save(tga, format="TGA")  # PIL reads it; the stream must not
    assert thumbnail_from_bytes(tga.getvalue(), None, spec, max_pixels=10**7) is None


def test_curation_settings(monkeypatch):
    s = load_settings()
    assert (s.review_band, s.review_margin, s.thumbnail_px) == (0.05, 0.03, 128)
    assert s.review_token is None and s.topic_deer_changes == "deer.changes"
    monkeypatch.setenv("REID_REVIEW_TOKEN", "s3cr3t-v4lue")
    monkeypatch.setenv("REID_THUMBNAIL_PX", "0")
    s = load_settings()
    assert s.review_token.get_secret_value() == "s3cr3t-v4lue" and "s3cr3t" not in repr(s)
    assert s.thumbnail_px == 0


def test_the_embedded_stack_exports_a_short_fetch_wait(monkeypatch):
    from streams.tools.stack import EMBEDDED_FETCH_WAIT_MS, StackInfo

    info = StackInfo(kafka_port=19092, postgres_port=15432, redis_port=16379)
    env = info.env()
    assert env["REID_KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:19092"
    for name, value in env.items():  # what `stack up` prints is what the settings read
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.consumer_config()["fetch.wait.max.ms"] == EMBEDDED_FETCH_WAIT_MS
    assert s.redis_url.get_secret_value() == info.redis_url
    monkeypatch.delenv("REID_KAFKA_FETCH_WAIT_MS")
    assert load_settings().consumer_config()["fetch.wait.max.ms"] == 500  # a real cluster's
