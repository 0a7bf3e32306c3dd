-- The audit log on PostgreSQL: one chain that every replica appends to.
-- Columns as in the SQLite backend (schema v3); BYTEA for the hashes.
CREATE TABLE IF NOT EXISTS audit_events (
    sequence         BIGINT PRIMARY KEY,  -- 1-based, gapless, assigned under the anchor's row lock
    time_unix_nanos  BIGINT NOT NULL,
    identity         TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL,
    operation        TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    credential_id    TEXT NOT NULL,
    lease_id         TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    code             TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    detail           TEXT NOT NULL,
    prev_hash        BYTEA NOT NULL,
    hash             BYTEA NOT NULL,
    job_id           TEXT NOT NULL,
    recording_id     TEXT NOT NULL,
    destination_id   TEXT NOT NULL,
    instance_id      TEXT NOT NULL         -- the replica that wrote it (hashed)
);
-- Filters are exact matches paged by sequence: (column, sequence) serves both.
CREATE INDEX IF NOT EXISTS audit_events_tenant ON audit_events (tenant_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_credential ON audit_events (credential_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_unix_nanos);
CREATE INDEX IF NOT EXISTS audit_events_job ON audit_events (job_id, sequence);
-- The chain's head, MAC'd under the audit key. Every batch locks this row
-- (which serializes the writers of all replicas), chains onto the head it
-- names, and moves it in the same transaction: events cut from the end of
-- the table leave an anchor that names events no longer there.
CREATE TABLE IF NOT EXISTS audit_anchor (
    id       SMALLINT PRIMARY KEY CHECK (id = 1),
    sequence BIGINT NOT NULL,
    hash     BYTEA NOT NULL,
    mac      BYTEA NOT NULL
);
