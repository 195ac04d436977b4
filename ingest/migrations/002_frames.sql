-- edgelabel ingest, schema version 2: the frames a label record names, fetched from the appliances into the
-- plant's frame store (docs/ingest.md "Frames").  One row per record whose frame_sha256 is set; the row is made
-- by a trigger in the transaction that stores the record, so a record is never stored without its frame row.

CREATE TABLE frames (
    record_id    uuid PRIMARY KEY,                -- the label record (records.id)
    device       text NOT NULL,
    source       text NOT NULL,
    frame_sha256 text NOT NULL,                   -- what the appliance hashed when it stored the image
    frame_path   text,                            -- where the appliance keeps it (only its suffix is used here)
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'fetched', 'failed')),
    location     text,                            -- path under the frame folder, or the S3 key
    bytes        bigint,
    attempts     integer NOT NULL DEFAULT 0,      -- tries that reached the appliance
    last_error   text,
    next_try_at  timestamptz NOT NULL DEFAULT now(),
    fetched_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX frames_pending ON frames (next_try_at) WHERE status = 'pending';
CREATE INDEX frames_status_device ON frames (status, device);

-- a statement trigger with a transition table: one INSERT ... SELECT per batch, not one per record
CREATE FUNCTION frames_from_records() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO frames (record_id, device, source, frame_sha256, frame_path, status, last_error)
    SELECT n.id, n.device, n.source, n.record ->> 'frame_sha256', n.record ->> 'frame_path',
           CASE WHEN n.record ->> 'frame_sha256' ~ '^[0-9a-f]{64}$' THEN 'pending' ELSE 'failed' END,
           CASE WHEN n.record ->> 'frame_sha256' ~ '^[0-9a-f]{64}$' THEN NULL
                ELSE 'the record''s frame_sha256 is not a lowercase hex sha256; nothing to verify against' END
    FROM new_records n
    WHERE jsonb_typeof(n.record -> 'frame_sha256') = 'string'
    ON CONFLICT (record_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER records_frames AFTER INSERT ON records REFERENCING NEW TABLE AS new_records
    FOR EACH STATEMENT EXECUTE FUNCTION frames_from_records();

-- records stored before this version
INSERT INTO frames (record_id, device, source, frame_sha256, frame_path)
SELECT r.id, r.device, r.source, r.record ->> 'frame_sha256', r.record ->> 'frame_path'
FROM records r
WHERE r.record ->> 'frame_sha256' ~ '^[0-9a-f]{64}$'
ON CONFLICT (record_id) DO NOTHING;

-- the query surface gains where each record's frame is (columns appended; the others unchanged)
CREATE OR REPLACE VIEW label_records AS
SELECT r.id, r.device, r.source, r.frame_index, r.captured_at, r.model,
       COALESCE(r.reviewed_detections, r.record -> 'detections') AS detections,
       r.review_state,
       r.record -> 'detections' AS model_detections,
       r.review_version, r.reviewed_by, r.reviewed_at, r.frame_key, r.media_time, r.received_at,
       f.location AS frame_location, f.status AS frame_status
FROM records r LEFT JOIN frames f ON f.record_id = r.id;
