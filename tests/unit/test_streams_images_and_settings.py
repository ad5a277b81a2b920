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
    return ImageRoots([root]), root


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
