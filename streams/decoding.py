"""The prepare stage of a batch: parse every message, read and decode the images of the
valid ones, crop and resize them for the batch's model, and stack them into one tensor.

Whatever goes wrong here is one event's problem: bad input keeps its reason, any other error
makes the event ``unprocessable``; both are dead-lettered by the finish stage.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from reid.embedder import Embedder
from reid.gpu_decode import decode_crops
from sinks.metrics import StreamMetrics
from streams.batch import PendingEvent, PreparedBatch
from streams.events import InvalidEvent, parse_detection
from streams.images import (
    ImageRoots,
    ImageSourceUnavailable,
    ThumbnailSpec,
    crop_with_thumbnail,
    image_bytes,
    thumbnail_from_bytes,
)
from streams.settings import Settings

log = logging.getLogger(__name__)


class BatchDecoder:
    """Parses and decodes batches in a thread pool; ``start()`` before use, ``stop()`` after."""

    def __init__(self, settings: Settings, metrics: StreamMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.roots = ImageRoots.from_settings(settings)
        self.thumbnail = (
            ThumbnailSpec(settings.thumbnail_px, settings.thumbnail_max_bytes)
            if settings.thumbnail_px
            else None
        )
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        workers = self.settings.decode_workers or max(1, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def fill(self, batch: PreparedBatch) -> None:
        """Parse, decode and stack the batch's messages for ``batch.embedder``."""
        self._parse(batch)
        self._decode(batch)
        self._stack(batch)

    def _parse(self, batch: PreparedBatch) -> None:
        """Valid events, first occurrence of each detection_id, and the in-batch repeats."""
        firsts: dict[str, PendingEvent] = {}
        for message in batch.messages:
            try:
                event = parse_detection(message.value, max_bytes=self.settings.max_message_bytes)
            except InvalidEvent as err:
                batch.invalid.append((message, err))
                continue
            except Exception as err:  # a parser bug: still this event's problem alone
                log.exception("batch %d: parsing offset %d failed", batch.batch_id, message.offset)
                batch.invalid.append((message, InvalidEvent.unprocessable(err)))
                continue
            item = PendingEvent(message, event)
            if event.detection_id in firsts:
                batch.repeats.append(item)
            else:
                firsts[event.detection_id] = item
        batch.firsts = list(firsts.values())

    def _decode(self, batch: PreparedBatch) -> None:
        """Read, decode, crop and resize in the thread pool; failures are kept per event
        (dead-lettered by ``finish`` unless the event turns out to be stored already)."""
        assert self._pool is not None and batch.embedder is not None, "start() first"
        t0 = time.perf_counter()
        embedder = batch.embedder
        if self._decode_on_device(embedder):
            self._decode_on_gpu(batch, embedder)
        else:
            preprocess = embedder.preprocess
            max_pixels = self.settings.max_image_pixels
            futures = [
                self._pool.submit(crop_with_thumbnail, p.event, self.roots, preprocess,
                                  max_pixels=max_pixels, thumbnail=self.thumbnail)
                for p in batch.firsts
            ]  # fmt: skip
            for item, future in zip(batch.firsts, futures, strict=True):
                try:
                    item.pixels, item.thumbnail = future.result()
                except Exception as err:
                    self._failed(batch, item, err)
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - t0)

    def _stack(self, batch: PreparedBatch) -> None:
        """One uint8 tensor of the decoded crops, each item knowing its row. For a GPU model it
        is in pinned memory, so that its copy to the device does not block the host."""
        assert batch.embedder is not None
        decoded = [p for p in batch.firsts if p.pixels is not None]
        if not decoded:
            return
        shape = Counter(tuple(p.pixels.shape) for p in decoded).most_common(1)[0][0]  # type: ignore[union-attr]
        for item in [p for p in decoded if tuple(p.pixels.shape) != shape]:  # type: ignore[union-attr]
            batch.undecodable[item.event.detection_id] = InvalidEvent.unprocessable(
                ValueError(f"decoded to {tuple(item.pixels.shape)}, the batch to {shape}")  # type: ignore[union-attr]
            )
            item.pixels = None
        decoded = [p for p in decoded if p.pixels is not None]
        stacked = torch.stack([p.pixels for p in decoded])  # type: ignore[misc]
        if stacked.device.type == "cpu" and batch.embedder.device.startswith("cuda"):
            stacked = stacked.pin_memory()
        for row, item in enumerate(decoded):
            item.row = row
            item.pixels = None
        batch.pixels = stacked

    @staticmethod
    def _failed(batch: PreparedBatch, item: PendingEvent, err: Exception) -> None:
        """Reading or decoding ``item``'s image failed: bad input, a dependency failure (the
        batch is prepared again by ``finish``), or any other error (unprocessable)."""
        if isinstance(err, ImageSourceUnavailable):
            log.warning("batch %d: %s", batch.batch_id, err)
            batch.unavailable = err
        else:
            batch.undecodable[item.event.detection_id] = _undecodable(err)

    def _decode_on_device(self, embedder: Embedder) -> bool:
        mode = self.settings.gpu_decode
        return mode == "on" or (mode == "auto" and embedder.device.startswith("cuda"))

    def _decode_on_gpu(self, batch: PreparedBatch, embedder: Embedder) -> None:
        """nvJPEG on the model's device: files are read in the pool, the JPEGs decoded,
        cropped and resized as one batch on the GPU (others fall back to the CPU path)."""
        assert self._pool is not None
        futures = [self._pool.submit(image_bytes, p.event, self.roots) for p in batch.firsts]
        readable: list[tuple[PendingEvent, bytes]] = []
        for item, future in zip(batch.firsts, futures, strict=True):
            try:
                readable.append((item, future.result()))
            except Exception as err:
                self._failed(batch, item, err)
        if not readable:
            return
        thumbs = [
            self._pool.submit(thumbnail_from_bytes, data, item.event.bbox, self.thumbnail,
                              max_pixels=self.settings.max_image_pixels)
            for item, data in (readable if self.thumbnail is not None else [])
        ]  # fmt: skip
        decoded = decode_crops(
            [data for _, data in readable], [item.event.bbox for item, _ in readable],
            embedder.preprocess, device=embedder.device,
            max_pixels=self.settings.max_image_pixels,
        )  # fmt: skip
        for (item, _), thumb in zip(readable, thumbs, strict=False):  # made meanwhile
            item.thumbnail = thumb.result()
        for k, index in enumerate(decoded.index):
            readable[index][0].pixels = decoded.images[k]
        for index, err in decoded.errors.items():
            item = readable[index][0]
            batch.undecodable[item.event.detection_id] = InvalidEvent(err.reason, str(err))


def _undecodable(err: Exception) -> InvalidEvent:
    """Why an event's image could not be read or decoded: bad input, or (any other error)
    unprocessable. Never the batch's problem."""
    if isinstance(err, InvalidEvent):
        return err
    log.error("decoding an image failed: %s: %s", type(err).__name__, err, exc_info=err)
    return InvalidEvent.unprocessable(err)
