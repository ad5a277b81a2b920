-- The deer gallery and the detections assigned to it, both keyed by embedding version.

CREATE EXTENSION IF NOT EXISTS vector;

-- Ids come from a sequence, not from a batch-local counter, so that workers never collide.
CREATE SEQUENCE IF NOT EXISTS deer_id_seq AS bigint;

CREATE TABLE deer (
    id                bigint PRIMARY KEY,
    embedding_version text NOT NULL,
    centroid_resnet   vector(512) NOT NULL,
    centroid_effnet   vector(512) NOT NULL,
    sightings         bigint NOT NULL,
    first_seen        timestamptz NOT NULL,
    last_seen         timestamptz NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX deer_embedding_version_idx ON deer (embedding_version);

CREATE TABLE detections (
    detection_id      text PRIMARY KEY,
    camera_id         text NOT NULL,
    captured_at       timestamptz NOT NULL,
    -- Deferred: a batch inserts its detections first (to learn which are new) and the new
    -- deer they point at afterwards, in the same transaction.
    deer_id           bigint NOT NULL REFERENCES deer (id) DEFERRABLE INITIALLY DEFERRED,
    is_new_deer       boolean NOT NULL,
    similarity        real,
    score_resnet      real,
    score_effnet      real,
    embedding_version text NOT NULL,
    embedding_resnet  vector(512) NOT NULL,
    embedding_effnet  vector(512) NOT NULL,
    bbox              real[],
    confidence        real,
    species           text,
    source_topic      text NOT NULL,
    source_partition  int NOT NULL,
    source_offset     bigint NOT NULL,
    processed_at      timestamptz NOT NULL,
    content_sha256    bytea
);

CREATE INDEX detections_deer_id_idx ON detections (deer_id);
CREATE INDEX detections_camera_captured_idx ON detections (camera_id, captured_at);

-- Keep vectors inline: with the default out-of-line (TOAST) storage exact search was
-- measured 10x slower, and a 512-d vector (2 KiB) still fits twice in a page.
ALTER TABLE deer ALTER COLUMN centroid_resnet SET STORAGE PLAIN;
ALTER TABLE deer ALTER COLUMN centroid_effnet SET STORAGE PLAIN;
ALTER TABLE detections ALTER COLUMN embedding_resnet SET STORAGE PLAIN;
ALTER TABLE detections ALTER COLUMN embedding_effnet SET STORAGE PLAIN;

CREATE INDEX deer_centroid_resnet_hnsw ON deer
    USING hnsw (centroid_resnet vector_cosine_ops) WITH (m = 16, ef_construction = 64);
CREATE INDEX deer_centroid_effnet_hnsw ON deer
    USING hnsw (centroid_effnet vector_cosine_ops) WITH (m = 16, ef_construction = 64);
CREATE INDEX detections_embedding_resnet_hnsw ON detections
    USING hnsw (embedding_resnet vector_cosine_ops) WITH (m = 16, ef_construction = 64);
CREATE INDEX detections_embedding_effnet_hnsw ON detections
    USING hnsw (embedding_effnet vector_cosine_ops) WITH (m = 16, ef_construction = 64);
