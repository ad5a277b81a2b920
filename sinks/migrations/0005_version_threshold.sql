-- Each embedding version carries its own assignment threshold. A trained model compresses its
-- scores differently from the seeded or ImageNet ensemble (docs/ACCURACY.md shows one whose
-- every best match scores above 0.94), so one global REID_THRESHOLD cannot fit every version.
-- NULL: the version uses REID_THRESHOLD. Set by `reid-stream activate V --threshold T`; read
-- by the live consumers with the active version (streams/versions.py).
ALTER TABLE embedding_versions
    ADD COLUMN threshold real CHECK (threshold IS NULL OR threshold BETWEEN -1 AND 1);
