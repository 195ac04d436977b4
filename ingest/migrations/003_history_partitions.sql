-- edgelabel ingest, schema version 3: track events, alarms and the status history partitioned by month like
-- records, so that retention.months drops them as whole tables (docs/ingest.md "Partitions by month").
--   track_events   by at (the capture time of the frame that produced the event; required by event.v1)
--   alarms         by at (the time the device stated the alarm)
--   device_status  by received_at
-- reviews stay one table: a decision may arrive long after its record and must wait there to be applied.
--
-- Existing rows are moved in place, in this migration's transaction: each table is renamed, a partitioned
-- table of the same name and columns is made, a partition is made for every month its rows cover, the rows
-- are copied, the old table is dropped.  The view events is made again on the new table (same columns).

DROP VIEW events;

ALTER TABLE track_events RENAME TO track_events_v2;
ALTER TABLE alarms RENAME TO alarms_v2;
ALTER TABLE device_status RENAME TO device_status_v2;

-- an event without its time cannot be placed in a month: it takes the time it was received (none is
-- expected: ingest stored at from the message, and event.v1 requires it)
UPDATE track_events_v2 SET at = received_at WHERE at IS NULL;

-- the partition key is part of every unique key: an event is (id, at); a redelivered event carries the
-- same at, so ON CONFLICT (id, at) still stores it once
CREATE TABLE track_events (
    id          uuid NOT NULL,
    type        text NOT NULL,
    device      text NOT NULL,
    source      text,
    record_id   uuid,
    track_uid   text,
    label       text,
    at          timestamptz NOT NULL,
    event       jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);

CREATE TABLE alarms (
    device      text NOT NULL,
    at          timestamptz NOT NULL,
    active      boolean NOT NULL,
    alarms      jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, at)
) PARTITION BY RANGE (at);

CREATE TABLE device_status (
    device      text NOT NULL,
    source      text NOT NULL DEFAULT '',
    status      text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (received_at);

-- one partition per month that existing rows cover (the worker makes the later ones ahead of each batch)
DO $$
DECLARE
    t record;
    m timestamptz;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('track_events', 'at'), ('alarms', 'at'), ('device_status', 'received_at'))
             AS x(name, col) LOOP
        FOR m IN EXECUTE format('SELECT DISTINCT date_trunc(''month'', %I AT TIME ZONE ''UTC'') AT TIME ZONE ''UTC'' '
                                'FROM %I', t.col, t.name || '_v2') LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           t.name || to_char(m AT TIME ZONE 'UTC', '_YYYY_MM'), t.name, m,
                           (m AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC');
        END LOOP;
    END LOOP;
END $$;

INSERT INTO track_events SELECT id, type, device, source, record_id, track_uid, label, at, event, received_at
FROM track_events_v2;
INSERT INTO alarms SELECT device, at, active, alarms, received_at FROM alarms_v2;
INSERT INTO device_status SELECT device, source, status, received_at FROM device_status_v2;

DROP TABLE track_events_v2, alarms_v2, device_status_v2;

CREATE INDEX track_events_device_time ON track_events (device, at);
CREATE INDEX track_events_type_time ON track_events (type, at);
CREATE INDEX track_events_record ON track_events (record_id);
CREATE INDEX track_events_id ON track_events (id);
CREATE INDEX device_status_time ON device_status (device, received_at);

CREATE VIEW events AS
SELECT e.id, e.type, e.device, e.source, e.record_id, e.track_uid, e.label, e.at, e.event, e.received_at
FROM track_events e;
