-- Live leases, shared by every replica: a lease acquired on one vault can be
-- released on another, and expiry is judged by the database's clock, the
-- one clock every replica shares. Holds no secret.
CREATE TABLE IF NOT EXISTS leases (
    lease_id      TEXT PRIMARY KEY,
    credential_id TEXT NOT NULL,
    tenant_id     TEXT NOT NULL,
    holder        TEXT NOT NULL,
    granted_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expires_at ON leases (expires_at);
