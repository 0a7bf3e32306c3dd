-- Version 5: claims, object keys unique per real location, the key of an
-- open multipart upload beside its id, and who wrote each history line.
ALTER TABLE jobs ADD COLUMN multipart_upload_key TEXT;
ALTER TABLE jobs ADD COLUMN multipart_upload_location TEXT;
-- The destination's normalized provider endpoint and bucket: object_key is
-- unique there, whichever destination id points at it. Filled for existing
-- rows by store/sqlite.rs from their destination.
ALTER TABLE jobs ADD COLUMN object_location TEXT;
ALTER TABLE jobs ADD COLUMN claim_owner TEXT;
ALTER TABLE jobs ADD COLUMN claim_expires_at INTEGER;   -- Unix ms
ALTER TABLE job_events ADD COLUMN replica TEXT NOT NULL DEFAULT '';
DROP INDEX IF EXISTS jobs_by_object_key;
CREATE UNIQUE INDEX jobs_by_location_key ON jobs (object_location, object_key);
CREATE INDEX jobs_by_claim ON jobs (state, claim_expires_at);
