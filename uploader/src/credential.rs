//! Provider credentials parsed from a leased vault secret, held in zeroizing memory.
//!
//! Parsing never echoes a value: errors name the field and what is wrong with it.
//! These types have no `Clone`, no `Display` and a redacted `Debug`; reading a
//! secret is an explicit `expose_*` call. Nothing here caches, logs or persists.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use zeroize::Zeroizing;

/// An S3 access key pair (and optional session token), zeroized on drop.
///
/// Parsed from the vault secret JSON
/// `{"access_key_id": "...", "secret_access_key": "...", "session_token": "..."}`
/// (`session_token` optional) with [`S3Credential::from_json`].
pub struct S3Credential {
    access_key_id: Zeroizing<String>,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

impl S3Credential {
    /// Parses the vault secret bytes. The caller keeps ownership of (and wipes)
    /// `json`; strings are copied straight into zeroizing buffers.
    ///
    /// Fields other than the three known ones are ignored, so a credential may
    /// carry labels. Every error names a field (or a position), never a value.
    pub fn from_json(json: &[u8]) -> Result<Self, CredentialError> {
        let current = Cell::new(None);
        let mut de = serde_json::Deserializer::from_slice(json);
        let parsed = S3Seed { current: &current }
            .deserialize(&mut de)
            .and_then(|raw| de.end().map(|()| raw));
        let raw = match parsed {
            Ok(raw) => raw,
            // serde_json's messages can quote the offending value ("invalid type:
            // string \"…\""), so only its category and position are kept.
            Err(e) => {
                return Err(match (e.classify(), current.get()) {
                    (serde_json::error::Category::Data, Some((field, reason))) => {
                        CredentialError::Invalid { field, reason }
                    }
                    (serde_json::error::Category::Data, None) => CredentialError::NotAnObject,
                    _ => CredentialError::Malformed {
                        line: e.line(),
                        column: e.column(),
                    },
                });
            }
        };
        let access_key_id = require(raw.access_key_id, "access_key_id")?;
        let secret_access_key = require(raw.secret_access_key, "secret_access_key")?;
        let session_token = match raw.session_token {
            Some(token) if token.is_empty() => None,
            Some(token) => Some(check_chars(token, "session_token")?),
            None => None,
        };
        Ok(Self {
            access_key_id,
            secret_access_key,
            session_token,
        })
    }

    /// The access key id. Not a secret on its own, but still not logged whole:
    /// use [`S3Credential::masked_access_key_id`] for messages.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The access key id shortened for logs and messages, e.g. `AKIA…1234`.
    pub fn masked_access_key_id(&self) -> String {
        mask(&self.access_key_id)
    }

    /// The secret access key. Every call site is a place where plaintext is used.
    pub fn expose_secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// The session token, when the credential is temporary (STS).
    pub fn expose_session_token(&self) -> Option<&str> {
        self.session_token.as_deref().map(String::as_str)
    }
}

impl fmt::Debug for S3Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credential")
            .field("access_key_id", &self.masked_access_key_id())
            .field("secret_access_key", &"[REDACTED]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}

/// Why a credential secret could not be parsed. Never carries a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// A required field is absent (or empty).
    #[error(
        "S3 credential: field `{field}` is missing; store the credential as JSON \
         {{\"access_key_id\": \"…\", \"secret_access_key\": \"…\", \"session_token\": \"…\" (optional)}}"
    )]
    Missing {
        /// The JSON field name.
        field: &'static str,
    },
    /// A field is present but its value is unusable.
    #[error("S3 credential: field `{field}` {reason}; store a corrected credential")]
    Invalid {
        /// The JSON field name.
        field: &'static str,
        /// What is wrong, without the value.
        reason: &'static str,
    },
    /// The secret is valid JSON but not an object.
    #[error("S3 credential: expected a JSON object with access_key_id and secret_access_key")]
    NotAnObject,
    /// The secret is not valid JSON.
    #[error(
        "S3 credential: not valid JSON (line {line}, column {column}); store the credential as a JSON object"
    )]
    Malformed {
        /// 1-based line of the syntax error.
        line: usize,
        /// 1-based column of the syntax error.
        column: usize,
    },
}

fn require(
    value: Option<Zeroizing<String>>,
    field: &'static str,
) -> Result<Zeroizing<String>, CredentialError> {
    match value {
        Some(v) if !v.is_empty() => check_chars(v, field),
        _ => Err(CredentialError::Missing { field }),
    }
}

/// Whitespace or control characters in a key are a copy-paste accident, and
/// would otherwise surface later as a baffling signature mismatch.
fn check_chars(
    value: Zeroizing<String>,
    field: &'static str,
) -> Result<Zeroizing<String>, CredentialError> {
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CredentialError::Invalid {
            field,
            reason: "contains whitespace or control characters (check for a pasted newline)",
        });
    }
    Ok(value)
}

fn mask(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() < 12 {
        return "…".to_owned();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[derive(Default)]
struct RawS3 {
    access_key_id: Option<Zeroizing<String>>,
    secret_access_key: Option<Zeroizing<String>>,
    session_token: Option<Zeroizing<String>>,
}

/// Deserializes the credential object while recording which field is being
/// read, so an error can name it without quoting serde's message.
struct S3Seed<'c> {
    /// The field being read and what to say if reading it fails.
    current: &'c Cell<Option<(&'static str, &'static str)>>,
}

impl<'de> DeserializeSeed<'de> for S3Seed<'_> {
    type Value = RawS3;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawS3, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for S3Seed<'_> {
    type Value = RawS3;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an S3 credential object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawS3, A::Error> {
        let mut raw = RawS3::default();
        while let Some(key) = map.next_key::<FieldName>()? {
            let (field, slot) = match key {
                FieldName::AccessKeyId => ("access_key_id", &mut raw.access_key_id),
                FieldName::SecretAccessKey => ("secret_access_key", &mut raw.secret_access_key),
                FieldName::SessionToken => ("session_token", &mut raw.session_token),
                FieldName::Other => {
                    self.current.set(None);
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                self.current.set(Some((field, "appears more than once")));
                return Err(de::Error::custom("duplicate field"));
            }
            self.current.set(Some((field, "must be a JSON string")));
            let value = map.next_value_seed(ZeroizingString)?;
            *slot = value;
            self.current.set(None);
        }
        Ok(raw)
    }
}

enum FieldName {
    AccessKeyId,
    SecretAccessKey,
    SessionToken,
    Other,
}

impl<'de> de::Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = FieldName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FieldName, E> {
                Ok(match v {
                    "access_key_id" => FieldName::AccessKeyId,
                    "secret_access_key" => FieldName::SecretAccessKey,
                    "session_token" => FieldName::SessionToken,
                    _ => FieldName::Other,
                })
            }
        }
        deserializer.deserialize_identifier(V)
    }
}

/// A string (or `null`) copied once, directly into a zeroizing buffer.
///
/// Note: serde_json unescapes strings containing `\` escapes in its own
/// scratch buffer, which it does not wipe; unescaped strings are borrowed
/// straight from the caller's (zeroizing) input.
struct ZeroizingString;

impl<'de> DeserializeSeed<'de> for ZeroizingString {
    type Value = Option<Zeroizing<String>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ZeroizingString {
    type Value = Option<Zeroizing<String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        // Allocate the exact size up front so the buffer never reallocates
        // (a reallocation would leave an unwiped copy behind).
        let mut s = Zeroizing::new(String::with_capacity(v.len()));
        s.push_str(v);
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_all_fields() {
        let c = S3Credential::from_json(
            br#"{"access_key_id":"AKIAABCDEFGH1234","secret_access_key":"s3cr3t\/key","session_token":"tok"}"#,
        )
        .unwrap();
        assert_eq!(c.access_key_id(), "AKIAABCDEFGH1234");
        assert_eq!(c.expose_secret_access_key(), "s3cr3t/key");
        assert_eq!(c.expose_session_token(), Some("tok"));
        assert_eq!(c.masked_access_key_id(), "AKIA…1234");
    }

    #[test]
    fn null_or_empty_token_is_none() {
        for json in [
            &br#"{"access_key_id":"AKIAABCDEFGH1234","secret_access_key":"x","session_token":null}"#[..],
            br#"{"access_key_id":"AKIAABCDEFGH1234","secret_access_key":"x","session_token":""}"#,
            br#"{"access_key_id":"AKIAABCDEFGH1234","secret_access_key":"x","label":{"a":[1]}}"#,
        ] {
            assert_eq!(
                S3Credential::from_json(json)
                    .unwrap()
                    .expose_session_token(),
                None
            );
        }
    }

    #[test]
    fn wrong_type_names_field_not_value() {
        let e = S3Credential::from_json(
            br#"{"access_key_id":"AKIAABCDEFGH1234","secret_access_key":987654321}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            CredentialError::Invalid {
                field: "secret_access_key",
                reason: "must be a JSON string"
            }
        );
        assert!(!e.to_string().contains("987654321"), "{e}");
    }
}
