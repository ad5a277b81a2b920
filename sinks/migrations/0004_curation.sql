-- Curation: decisions flagged for review (with the deer they were compared with), a small
-- thumbnail of each crop, the log of curation changes (merge, split, move, confirm) and the
-- aliases that keep merged deer ids resolvable (sinks/curation.py, docs/curation.md).

-- needs_review and candidates are the record of the match-time decision, like similarity:
-- candidates is a JSON list of {deer_id, similarity, score_resnet, score_effnet}, best first.
ALTER TABLE detections ADD COLUMN needs_review boolean NOT NULL DEFAULT false;
ALTER TABLE detections ADD COLUMN candidates jsonb;
-- A JPEG of the crop (about 128 px on the long side, bounded by REID_THUMBNAIL_MAX_BYTES);
-- NULL when thumbnails are off or the crop could not be encoded small enough.
ALTER TABLE detections ADD COLUMN thumbnail bytea;
-- Set when a person decided (confirmed, moved, made a new deer); the queue is what is not.
ALTER TABLE detections ADD COLUMN reviewed_at timestamptz;
ALTER TABLE detections ADD COLUMN review_outcome text
    CHECK (review_outcome IN ('confirmed', 'moved', 'new_deer'));

-- The review queue: flagged and not reviewed yet, oldest first.
CREATE INDEX detections_review_queue_idx ON detections (processed_at, detection_id)
    WHERE needs_review AND reviewed_at IS NULL;

-- One row per change, in the order they were made; id is the curation generation that live
-- consumers compare with their in-memory gallery's. published_at is set once the change is
-- acknowledged on the deer.changes topic (an outbox: unpublished rows are sent first by the
-- next change).
CREATE TABLE deer_changes (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('merge', 'split', 'move', 'confirm')),
    -- merge: the survivor; split: the deer split; move: the target; confirm: the deer kept.
    deer_id      bigint NOT NULL,
    -- merge: the deer merged away; split: the new deer; otherwise NULL.
    other_id     bigint,
    -- move: the deer the detections came from; otherwise empty.
    source_ids   bigint[] NOT NULL DEFAULT '{}',
    detections   text[] NOT NULL DEFAULT '{}',
    reason       text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE INDEX deer_changes_deer_idx ON deer_changes (deer_id);
CREATE INDEX deer_changes_other_idx ON deer_changes (other_id) WHERE other_id IS NOT NULL;
CREATE INDEX deer_changes_unpublished_idx ON deer_changes (id) WHERE published_at IS NULL;

-- A merged-away id and the deer it now is. Chains are flattened when the survivor is merged
-- in turn, so one look-up resolves any old id.
CREATE TABLE deer_aliases (
    alias_id   bigint PRIMARY KEY,
    deer_id    bigint NOT NULL REFERENCES deer (id),
    change_id  bigint NOT NULL REFERENCES deer_changes (id),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX deer_aliases_deer_idx ON deer_aliases (deer_id);
