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

-- TimescaleDB when the server has it: the three tables become hypertables (one-month chunks, dropped by
-- retention with drop_chunks).  Without it (CREATE EXTENSION fails: not installed, or not in
-- shared_preload_libraries) they are PostgreSQL declarative partitions, one per month.  records and
-- detections are declarative partitions since version 1 either way (a partitioned table cannot become a
-- hypertable).  ingest.db.timescale() tells which; a NOTICE says which was chosen.
DO $$
DECLARE
    ts boolean := false;
    t record;
    m timestamptz;
    cols text;
BEGIN
    BEGIN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        ts := true;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'TimescaleDB not available (%): declarative partitions by month', SQLERRM;
    END;
    FOR t IN SELECT * FROM (VALUES
        ('track_events', 'at', 'id uuid NOT NULL, type text NOT NULL, device text NOT NULL, source text, '
         'record_id uuid, track_uid text, label text, at timestamptz NOT NULL, event jsonb NOT NULL, '
         'received_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (id, at)'),
        ('alarms', 'at', 'device text NOT NULL, at timestamptz NOT NULL, active boolean NOT NULL, '
         'alarms jsonb NOT NULL, received_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (device, at)'),
        ('device_status', 'received_at', 'device text NOT NULL, source text NOT NULL DEFAULT '''', '
         'status text NOT NULL, received_at timestamptz NOT NULL DEFAULT now()')
    ) AS x(name, col, cols) LOOP
        IF ts THEN
            EXECUTE format('CREATE TABLE %I (%s)', t.name, t.cols);
            EXECUTE format('SELECT create_hypertable(%L, %L, chunk_time_interval => interval ''1 month'')',
                           t.name, t.col);
            CONTINUE;
        END IF;
        EXECUTE format('CREATE TABLE %I (%s) PARTITION BY RANGE (%I)', t.name, t.cols, t.col);
        -- one partition per month the existing rows cover (the worker makes the later ones ahead of each batch)
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
