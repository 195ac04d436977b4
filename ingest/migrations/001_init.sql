-- edgelabel ingest, schema version 1: devices, sources, label records, detections, events, reviews,
-- alarms and status.  Tables are the storage; the views label_records and events_v are the query surface
-- that later versions keep (docs/ingest.md).

CREATE TABLE devices (
    device      text PRIMARY KEY,
    status      text,                    -- online / stopped / offline (the Last Will), from <prefix>/<device>/status
    status_at   timestamptz,             -- when ingest received that status
    alarm       jsonb,                   -- the latest <prefix>/<device>/alarm payload
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sources (
    device      text NOT NULL,
    source      text NOT NULL,
    status      text,
    status_at   timestamptz,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, source)
);

-- the ids of every label record stored: the key that makes a record exactly once, whatever its captured_at
-- (records are partitioned by captured_at, and a partitioned table's unique keys must include it)
CREATE TABLE record_keys (
    id          uuid PRIMARY KEY,
    captured_at timestamptz NOT NULL
);
CREATE INDEX record_keys_time ON record_keys (captured_at);

-- one row per label record; the model's boxes stay in record->'detections', a person's in reviewed_detections.
-- Partitioned by month of captured_at (records_YYYY_MM, made by ingest ahead of the rows): retention drops
-- whole months.
CREATE TABLE records (
    id                  uuid NOT NULL,           -- uuid5(device, source, frame key): the same frame, the same id
    device              text NOT NULL,
    source              text NOT NULL,
    frame_index         bigint NOT NULL,
    frame_key           text NOT NULL,
    captured_at         timestamptz NOT NULL,
    media_time          double precision,
    model               text,
    record              jsonb NOT NULL,          -- the message as published (schema label-record.v1)
    received_at         timestamptz NOT NULL DEFAULT now(),
    review_state        text,                    -- NULL until a review decision arrives
    review_version      integer,
    reviewed_detections jsonb,
    reviewed_by         text,
    reviewed_at         timestamptz,
    PRIMARY KEY (id, captured_at)
) PARTITION BY RANGE (captured_at);
CREATE INDEX records_device_time ON records (device, captured_at);
CREATE INDEX records_time ON records (captured_at);
CREATE INDEX records_review_state ON records (review_state) WHERE review_state IS NOT NULL;

-- the model's detections, one row each, for queries by class, score, time and device; partitioned like records
CREATE TABLE detections (
    record_id   uuid NOT NULL,
    idx         integer NOT NULL,
    device      text NOT NULL,
    source      text NOT NULL,
    captured_at timestamptz NOT NULL,
    class_id    integer NOT NULL,
    label       text NOT NULL,
    score       real,
    box         real[] NOT NULL,                 -- x1, y1, x2, y2 in frame pixels
    track_id    bigint,
    PRIMARY KEY (record_id, idx, captured_at)
) PARTITION BY RANGE (captured_at);
CREATE INDEX detections_label_time ON detections (label, captured_at);
CREATE INDEX detections_class_score ON detections (class_id, score);
CREATE INDEX detections_device_time ON detections (device, captured_at);

-- track events (new/update/end) and zone/line events (zone_enter, zone_exit, line_cross)
CREATE TABLE track_events (
    id          uuid PRIMARY KEY,
    type        text NOT NULL,
    device      text NOT NULL,
    source      text,
    record_id   uuid,
    track_uid   text,
    label       text,
    at          timestamptz,
    event       jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX track_events_device_time ON track_events (device, at);
CREATE INDEX track_events_type_time ON track_events (type, at);
CREATE INDEX track_events_record ON track_events (record_id);

-- every review decision, every version; the highest version of a record_id is applied to records
-- (also when the decision arrived before its label record: it waits here until the record comes)
CREATE TABLE reviews (
    id          uuid PRIMARY KEY,
    record_id   uuid NOT NULL,
    device      text NOT NULL,
    source      text,
    version     integer NOT NULL,
    action      text NOT NULL,
    state       text NOT NULL,
    by_name     text,
    at          timestamptz,
    detections  jsonb NOT NULL,
    review      jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reviews_record_version ON reviews (record_id, version DESC);

-- alarm history: one row per distinct alarm state a device published (the topic is retained state, no id)
CREATE TABLE alarms (
    device      text NOT NULL,
    at          timestamptz NOT NULL,
    active      boolean NOT NULL,
    alarms      jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, at)
);

-- status history of devices (source '') and sources, as received
CREATE TABLE device_status (
    device      text NOT NULL,
    source      text NOT NULL DEFAULT '',
    status      text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_status_time ON device_status (device, received_at);

-- messages that could not be stored as data (not JSON, a missing field): kept, counted, never dropped silently
CREATE TABLE rejected_messages (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    payload     bytea NOT NULL,
    error       text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- the query surface (kept by later schema versions; columns may be added, never renamed or removed)
CREATE VIEW label_records AS
SELECT r.id, r.device, r.source, r.frame_index, r.captured_at, r.model,
       COALESCE(r.reviewed_detections, r.record -> 'detections') AS detections,
       r.review_state,
       r.record -> 'detections' AS model_detections,
       r.review_version, r.reviewed_by, r.reviewed_at, r.frame_key, r.media_time, r.received_at
FROM records r;

CREATE VIEW events AS
SELECT e.id, e.type, e.device, e.source, e.record_id, e.track_uid, e.label, e.at, e.event, e.received_at
FROM track_events e;
