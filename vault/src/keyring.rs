//! Versioned master keys: the root key file, HKDF-derived per-version keys.
