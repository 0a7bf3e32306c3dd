-- The job store as of schema version 4 (one uploader on one host). Older
-- databases (versions 1-3) are brought here by code in store/sqlite.rs
-- first; every statement only creates what is missing.
CREATE TABLE IF NOT EXISTS jobs (
    job_id              TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL,
    recording_id        TEXT NOT NULL,
    destination_id      TEXT NOT NULL,
    file_name           TEXT NOT NULL,
    content_type        TEXT NOT NULL,
    backup_path         TEXT NOT NULL,
    sha256              BLOB NOT NULL CHECK (length(sha256) = 32),
    size                INTEGER NOT NULL CHECK (size >= 0),
    state               TEXT NOT NULL CHECK (state IN
                          ('STORED','UPLOADING','VERIFYING','DELIVERED','RETRYING','RETAINED')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    location            TEXT,
    verified_by         TEXT,
    next_attempt_at     INTEGER,            -- Unix milliseconds; NULL = not scheduled
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    backup_corrupt      INTEGER NOT NULL DEFAULT 0,
    backup_deleted      INTEGER NOT NULL DEFAULT 0,
    multipart_upload_id TEXT,               -- kept across a crash so it is resumed or aborted
    request_id          TEXT,
    object_key          TEXT,               -- NULL = registered at the next attempt
    stored_sha256       BLOB CHECK (stored_sha256 IS NULL OR length(stored_sha256) = 32),
    retrying_since      INTEGER,            -- first failed attempt since creation or the last resend
    doubtful_failures   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant_id, recording_id)
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant_id, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_object_key ON jobs (destination_id, object_key);
CREATE TABLE IF NOT EXISTS job_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (job_id),
    time    INTEGER NOT NULL,
    state   TEXT NOT NULL,
    message TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
CREATE TABLE IF NOT EXISTS destinations (
    destination_id TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    name           TEXT NOT NULL,
    provider       TEXT NOT NULL,
    endpoint       TEXT NOT NULL,
    region         TEXT NOT NULL,
    bucket         TEXT NOT NULL,
    prefix         TEXT NOT NULL,
    path_style     INTEGER NOT NULL,
    credential_id  TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
