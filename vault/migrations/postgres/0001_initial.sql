-- The vault's first schema on PostgreSQL: the same tables as on SQLite
-- (credentials with sealed secrets only, wrapped master-key versions,
-- integer settings, per-tenant limits).
CREATE TABLE IF NOT EXISTS credentials (
    credential_id TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    name          TEXT NOT NULL,
    kind          INTEGER NOT NULL,
    version       BIGINT NOT NULL,
    labels        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    deleted       BOOLEAN NOT NULL DEFAULT FALSE,
    key_version   BIGINT NOT NULL,
    secret_chars  BIGINT NOT NULL,
    sealed        BYTEA
);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_live_name
    ON credentials (tenant_id, name) WHERE NOT deleted;
CREATE INDEX IF NOT EXISTS credentials_key_version
    ON credentials (key_version) WHERE NOT deleted;
CREATE TABLE IF NOT EXISTS key_versions (
    version    BIGINT PRIMARY KEY,
    wrapped    BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS tenant_limits (
    tenant_id        TEXT PRIMARY KEY,
    max_secret_chars BIGINT NOT NULL
);
