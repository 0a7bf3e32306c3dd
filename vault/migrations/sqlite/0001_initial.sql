-- The vault's first schema: credentials (sealed secrets only), wrapped
-- master-key versions, integer settings and per-tenant limits.
CREATE TABLE IF NOT EXISTS credentials (
    credential_id TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    kind          INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    labels        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0,
    key_version   INTEGER NOT NULL,
    secret_chars  INTEGER NOT NULL,
    sealed        BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_live_name
    ON credentials(tenant_id, name) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS credentials_key_version ON credentials(key_version) WHERE deleted = 0;
CREATE TABLE IF NOT EXISTS key_versions (
    version    INTEGER PRIMARY KEY,
    wrapped    BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tenant_limits (
    tenant_id        TEXT PRIMARY KEY,
    max_secret_chars INTEGER NOT NULL
);
