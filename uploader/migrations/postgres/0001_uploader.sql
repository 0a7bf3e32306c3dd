-- The uploader's jobs, their history and the destinations, shared by every
-- uploader replica. Times are Unix milliseconds (BIGINT), as in SQLite.
CREATE TABLE jobs (
    job_id                    TEXT PRIMARY KEY,
    tenant_id                 TEXT NOT NULL,
    recording_id              TEXT NOT NULL,
    destination_id            TEXT NOT NULL,
    file_name                 TEXT NOT NULL,
    content_type              TEXT NOT NULL,
    backup_path               TEXT NOT NULL,
    sha256                    BYTEA NOT NULL CHECK (length(sha256) = 32),
    size                      BIGINT NOT NULL CHECK (size >= 0),
    state                     TEXT NOT NULL CHECK (state IN
                                ('STORED','UPLOADING','VERIFYING','DELIVERED','RETRYING','RETAINED')),
    attempts                  BIGINT NOT NULL DEFAULT 0,
    last_error                TEXT,
    location                  TEXT,
    verified_by               TEXT,
    next_attempt_at           BIGINT,
    created_at                BIGINT NOT NULL,
    updated_at                BIGINT NOT NULL,
    backup_corrupt            BOOLEAN NOT NULL DEFAULT FALSE,
    backup_deleted            BOOLEAN NOT NULL DEFAULT FALSE,
    multipart_upload_id       TEXT,
    multipart_upload_key      TEXT,
    multipart_upload_location TEXT,
    request_id                TEXT,
    object_key                TEXT,
    object_location           TEXT,
    stored_sha256             BYTEA CHECK (stored_sha256 IS NULL OR length(stored_sha256) = 32),
    retrying_since            BIGINT,
    doubtful_failures         BIGINT NOT NULL DEFAULT 0,
    claim_owner               TEXT,
    claim_expires_at          BIGINT,
    UNIQUE (tenant_id, recording_id)
);
CREATE INDEX jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, created_at);
CREATE UNIQUE INDEX jobs_by_location_key ON jobs (object_location, object_key);
CREATE INDEX jobs_by_claim ON jobs (state, claim_expires_at);
CREATE TABLE job_events (
    id      BIGSERIAL PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs (job_id),
    time    BIGINT NOT NULL,
    state   TEXT NOT NULL,
    message TEXT NOT NULL,
    replica TEXT NOT NULL
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);
CREATE TABLE destinations (
    destination_id TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    name           TEXT NOT NULL,
    provider       TEXT NOT NULL,
    endpoint       TEXT NOT NULL,
    region         TEXT NOT NULL,
    bucket         TEXT NOT NULL,
    prefix         TEXT NOT NULL,
    path_style     BOOLEAN NOT NULL,
    credential_id  TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
