//! A256CBC-HS512 (RFC 7518 §5.2) and the sealed-credential envelope.
