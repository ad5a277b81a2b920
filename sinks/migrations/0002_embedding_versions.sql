-- Embedding versions side by side: a registry of versions, vectors per (detection, version)
-- and centroids per (deer, version). Deer identity (deer.id, the detections' deer_id) no
-- longer depends on a version; a replay gives the same deer new vectors.
--
-- Existing rows keep working: their vectors and centroids are copied into the new tables
-- under the version they were made with, and that version becomes the active one (the most
-- recently written one if several exist).

CREATE TABLE embedding_versions (
    version        text PRIMARY KEY,
    -- How to build the embedder again: a checkpoint path (with its SHA-256), or none for the
    -- seeded/ImageNet initialisation (then seed and input_size say which one).
    weights_path   text,
    weights_sha256 text,
    seed           int,
    input_size     int,
    -- registered: known, vectors may be partial; replaying: a replay is filling it;
    -- ready: a replay reached the end of the topic; active: the live consumer's version.
    state          text NOT NULL DEFAULT 'registered'
                   CHECK (state IN ('registered', 'replaying', 'ready', 'active')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    activated_at   timestamptz,
    replayed_at    timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- At most one active version; `reid-stream activate` switches it in one transaction.
CREATE UNIQUE INDEX embedding_versions_one_active ON embedding_versions ((true))
    WHERE state = 'active';

CREATE TABLE deer_centroids (
    deer_id           bigint NOT NULL REFERENCES deer (id) DEFERRABLE INITIALLY DEFERRED,
    embedding_version text NOT NULL REFERENCES embedding_versions (version),
    centroid_resnet   vector(512) NOT NULL,
    centroid_effnet   vector(512) NOT NULL,
    -- The number of vectors of this version merged into the centroids (the running mean's
    -- count); deer.sightings stays the version-independent number of detections.
    vectors           bigint NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (embedding_version, deer_id)
);

CREATE TABLE detection_vectors (
    detection_id      text NOT NULL REFERENCES detections (detection_id) ON DELETE CASCADE,
    embedding_version text NOT NULL REFERENCES embedding_versions (version),
    embedding_resnet  vector(512) NOT NULL,
    embedding_effnet  vector(512) NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (embedding_version, detection_id)
);

CREATE INDEX detection_vectors_detection_idx ON detection_vectors (detection_id);
-- The in-memory gallery's refresh reads the centroids written since a time (streams.gallery).
CREATE INDEX deer_centroids_updated_idx ON deer_centroids (embedding_version, updated_at);

-- Inline vectors, as in 0001 (exact search is 10x slower out of line).
ALTER TABLE deer_centroids ALTER COLUMN centroid_resnet SET STORAGE PLAIN;
ALTER TABLE deer_centroids ALTER COLUMN centroid_effnet SET STORAGE PLAIN;
ALTER TABLE detection_vectors ALTER COLUMN embedding_resnet SET STORAGE PLAIN;
ALTER TABLE detection_vectors ALTER COLUMN embedding_effnet SET STORAGE PLAIN;

-- Move the existing data.
INSERT INTO embedding_versions (version, state, created_at)
SELECT embedding_version, 'registered', min(created_at)
FROM deer GROUP BY embedding_version;

INSERT INTO embedding_versions (version, state, created_at)
SELECT DISTINCT embedding_version, 'registered', now() FROM detections
ON CONFLICT (version) DO NOTHING;

UPDATE embedding_versions SET state = 'active', activated_at = now()
WHERE version = (
    SELECT embedding_version FROM detections ORDER BY processed_at DESC LIMIT 1
);

INSERT INTO deer_centroids (deer_id, embedding_version, centroid_resnet, centroid_effnet, vectors)
SELECT id, embedding_version, centroid_resnet, centroid_effnet, sightings FROM deer;

INSERT INTO detection_vectors (detection_id, embedding_version, embedding_resnet, embedding_effnet)
SELECT detection_id, embedding_version, embedding_resnet, embedding_effnet FROM detections;

-- deer.embedding_version now means "created under"; its centroid columns are superseded by
-- deer_centroids and left NULL (kept, with 0001's indexes, so that nothing that names them
-- breaks). detections keeps the vectors its assignment was made with (its own
-- embedding_version) as the record of that decision; they become NULL when that version is
-- dropped.
ALTER TABLE deer ALTER COLUMN centroid_resnet DROP NOT NULL;
ALTER TABLE deer ALTER COLUMN centroid_effnet DROP NOT NULL;
UPDATE deer SET centroid_resnet = NULL, centroid_effnet = NULL;
ALTER TABLE detections ALTER COLUMN embedding_resnet DROP NOT NULL;
ALTER TABLE detections ALTER COLUMN embedding_effnet DROP NOT NULL;

-- Per-version HNSW indexes (partial, WHERE embedding_version = '<V>') are created by the
-- application when a version is registered (sinks.versions.ensure_indexes), since their
-- names and predicates depend on the version; here, for the versions that already exist.
-- The deferred foreign keys of the rows moved above are checked now, before the DDL.
SET CONSTRAINTS ALL IMMEDIATE;

DO $$
DECLARE
    v text;
    tag text;
BEGIN
    FOR v IN SELECT version FROM embedding_versions LOOP
        tag := substr(md5(v), 1, 12);
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON deer_centroids USING hnsw (centroid_resnet '
            'vector_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE embedding_version = %L',
            'deer_centroids_resnet_hnsw_' || tag, v);
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON deer_centroids USING hnsw (centroid_effnet '
            'vector_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE embedding_version = %L',
            'deer_centroids_effnet_hnsw_' || tag, v);
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON detection_vectors USING hnsw (embedding_resnet '
            'vector_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE embedding_version = %L',
            'detection_vectors_resnet_hnsw_' || tag, v);
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON detection_vectors USING hnsw (embedding_effnet '
            'vector_cosine_ops) WITH (m = 16, ef_construction = 64) WHERE embedding_version = %L',
            'detection_vectors_effnet_hnsw_' || tag, v);
    END LOOP;
END
$$;
