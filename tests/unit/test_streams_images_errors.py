"""What an OSError reading an ``image_uri`` means (issue 13, point 5): an absent file is
waited for, then bad input; a failing image store is a dependency failure (retried, never a
dead letter); permission denied, a directory, a loop stay bad input."""

from __future__ import annotations

import builtins
import errno
import os
import threading
from pathlib import Path

import pytest

from streams import images
from streams.events import InvalidEvent
from streams.images import ImageRoots, ImageSourceUnavailable, errno_class
from streams.settings import load_settings


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "cam1").mkdir()
    (tmp_path / "cam1" / "a.jpg").write_bytes(b"jpeg")
    return tmp_path


def roots_with(root: Path, fake: FakeTime, wait_s: float = 2.0) -> ImageRoots:
    return ImageRoots([root], wait_s=wait_s, sleep=fake.sleep, clock=fake.clock)


def failing_open(monkeypatch: pytest.MonkeyPatch, code: int, times: int) -> list[int]:
    """``open`` in streams.images raises OSError(code) for the first ``times`` calls."""
    calls: list[int] = []

    def fake_open(path, *args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", fake_open, raising=False)
    return calls


def test_a_file_that_appears_during_the_wait_is_read(root: Path) -> None:
    fake = FakeTime()
    late = root / "cam1" / "late.jpg"

    def sleep(seconds: float) -> None:
        fake.sleep(seconds)
        if len(fake.sleeps) == 3:  # the uploader finishes 0.3 s after the event
            late.write_bytes(b"late jpeg")

    roots = ImageRoots([root], wait_s=2.0, sleep=sleep, clock=fake.clock)
    assert roots.read("cam1/late.jpg") == b"late jpeg"
    assert fake.sleeps == [images.POLL_S] * 3


def test_an_absent_file_is_image_not_found_after_the_bounded_wait(root: Path) -> None:
    fake = FakeTime()
    with pytest.raises(InvalidEvent) as info:
        roots_with(root, fake, wait_s=0.5).read("cam1/missing.jpg")
    assert info.value.reason == "image_not_found"
    assert sum(fake.sleeps) == pytest.approx(0.5)
    assert max(fake.sleeps) <= images.POLL_S


def test_a_deadline_cuts_the_wait_short(root: Path) -> None:
    fake = FakeTime()
    with pytest.raises(InvalidEvent):
        roots_with(root, fake, wait_s=5.0).read("cam1/missing.jpg", deadline=fake.now + 0.25)
    assert sum(fake.sleeps) == pytest.approx(0.25)


def test_no_wait_with_zero_and_none_for_a_directory(root: Path) -> None:
    fake = FakeTime()
    with pytest.raises(InvalidEvent) as info:
        roots_with(root, fake, wait_s=0).read("cam1/missing.jpg")
    assert info.value.reason == "image_not_found"
    with pytest.raises(InvalidEvent) as info:
        roots_with(root, fake).read("cam1")  # a directory does not become a file
    assert info.value.reason == "image_not_found"
    assert fake.sleeps == []


@pytest.mark.parametrize(
    "code",
    [errno.EMFILE, errno.ENFILE, errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EINTR,
     errno.ENOMEM, errno.ETIMEDOUT, errno.EBUSY, errno.ENOBUFS, errno.EHOSTDOWN],
)  # fmt: skip
def test_transient_errors_are_retried_then_a_dependency_failure(
    root: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    fake = FakeTime()
    calls = failing_open(monkeypatch, code, times=100)
    with pytest.raises(ImageSourceUnavailable) as info:
        roots_with(root, fake).read("cam1/a.jpg")
    assert info.value.errno == code
    assert not isinstance(info.value, InvalidEvent | ValueError)  # never a dead letter
    assert len(calls) == len(images.TRANSIENT_RETRY_S) + 1
    assert fake.sleeps == list(images.TRANSIENT_RETRY_S)


def test_a_transient_error_that_clears_is_no_error(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTime()
    failing_open(monkeypatch, errno.EMFILE, times=2)
    assert roots_with(root, fake).read("cam1/a.jpg") == b"jpeg"


def test_a_transient_error_looking_the_file_up_is_a_dependency_failure(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Path.is_file() used to let EIO/ESTALE from stat() escape as a bare OSError (a crash).
    real_stat = Path.stat

    def stat(self: Path, *args, **kwargs):
        if self.name == "a.jpg":
            raise OSError(errno.ESTALE, "Stale file handle", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ImageSourceUnavailable):
        roots_with(root, FakeTime()).read("cam1/a.jpg")


@pytest.mark.parametrize(
    "code", [errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
             errno.EINVAL]
)  # fmt: skip
def test_the_event_own_errors_are_bad_input_at_once(
    root: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    fake = FakeTime()
    failing_open(monkeypatch, code, times=100)
    with pytest.raises(InvalidEvent) as info:
        roots_with(root, fake).read("cam1/a.jpg")
    assert info.value.reason == "image_not_found"
    assert os.strerror(code) in info.value.detail
    assert fake.sleeps == []


def test_a_file_removed_between_lookup_and_read_is_waited_for(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTime()
    failing_open(monkeypatch, errno.ENOENT, times=1)
    assert roots_with(root, fake).read("cam1/a.jpg") == b"jpeg"
    assert fake.sleeps == [images.POLL_S]


def test_a_symlink_loop_is_bad_input_not_a_crash(root: Path) -> None:
    os.symlink(root / "cam1" / "loop2.jpg", root / "cam1" / "loop1.jpg")
    os.symlink(root / "cam1" / "loop1.jpg", root / "cam1" / "loop2.jpg")
    fake = FakeTime()
    with pytest.raises(InvalidEvent) as info:
        roots_with(root, fake).read("cam1/loop1.jpg")
    assert info.value.reason == "image_not_found"


def test_errno_classes() -> None:
    assert errno_class(FileNotFoundError(errno.ENOENT, "x")) == "absent"
    assert errno_class(OSError(errno.ENOTDIR, "x")) == "absent"
    assert errno_class(OSError(errno.EMFILE, "x")) == "transient"
    assert errno_class(PermissionError(errno.EACCES, "x")) == "bad"
    assert errno_class(OSError("no errno at all")) == "bad"


def test_the_wait_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REID_IMAGE_WAIT_MS", "350")
    assert ImageRoots.from_settings(load_settings()).wait_s == pytest.approx(0.35)
    monkeypatch.delenv("REID_IMAGE_WAIT_MS")
    assert ImageRoots.from_settings(load_settings()).wait_s == pytest.approx(2.0)


def _swapped_after_lookup(monkeypatch: pytest.MonkeyPatch, roots: ImageRoots, swap) -> None:
    """Lets ``resolve`` check the path, then ``swap()`` changes what is there (a race)."""
    resolve = roots.resolve

    def resolve_then_swap(uri: str) -> Path:
        path = resolve(uri)
        swap(path)
        return path

    monkeypatch.setattr(roots, "resolve", resolve_then_swap)


def _read_bounded(roots: ImageRoots, uri: str) -> BaseException | bytes:
    """``read`` in a thread: a read that blocks fails the test instead of hanging it."""
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(roots.read(uri))
        except BaseException as err:  # handed to the test
            outcome.append(err)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, "reading blocked"
    return outcome[0]


def test_a_fifo_swapped_in_after_the_lookup_is_refused_not_waited_on(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = roots_with(root, FakeTime())

    def to_fifo(path: Path) -> None:
        path.unlink()
        os.mkfifo(path)

    _swapped_after_lookup(monkeypatch, roots, to_fifo)
    err = _read_bounded(roots, "cam1/a.jpg")
    assert isinstance(err, InvalidEvent) and err.reason == "image_not_found"


def _folder_to_link(path: Path, outside: Path) -> None:
    path.unlink()
    path.parent.rmdir()
    os.symlink(outside, path.parent)  # cam1/ now leads outside: cam1/a.jpg is outside/a.jpg


def _file_to_link(path: Path, outside: Path) -> None:
    path.unlink()
    os.symlink(outside / "a.jpg", path)


@pytest.mark.parametrize(
    ("swap", "reason"),
    [(_folder_to_link, "image_uri_forbidden"), (_file_to_link, "image_not_found")],
)
def test_a_path_swapped_for_a_link_outside_the_roots_is_not_read(
    root: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
    swap, reason: str,
) -> None:  # fmt: skip
    """Between the check and the open a folder or the file becomes a symlink out of the
    roots: what was opened is checked, and a final symlink is not followed (ELOOP)."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "a.jpg").write_bytes(b"secret")
    roots = roots_with(root, FakeTime())
    _swapped_after_lookup(monkeypatch, roots, lambda path: swap(path, outside))
    err = _read_bounded(roots, "cam1/a.jpg")
    assert isinstance(err, InvalidEvent) and err.reason == reason
