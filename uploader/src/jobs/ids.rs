//! Validated identifiers and names carried by a recording and its job.
//!
//! Each type checks its own rules once, at the edge (ingest header, database
//! row); code holding one may rely on it. None of them is a secret.

use std::fmt;

use uuid::Uuid;

/// Why a value was refused. The caller adds which field it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(String);

impl InvalidValue {
    /// What is wrong and what to send instead.
    pub fn problem(&self) -> &str {
        &self.0
    }
}

/// Longest tenant, recording or destination id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest file name, in bytes (the usual file-system limit).
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
/// Content type used when the recorder sends none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

const ID_CHARSET: &str = "letters, digits, '.', '_', ':' and '-'";

fn check_id(value: &str) -> Result<(), InvalidValue> {
    if value.is_empty() {
        return Err(InvalidValue("is empty".to_owned()));
    }
    if value.len() > MAX_ID_LEN {
        return Err(InvalidValue(format!(
            "is {} bytes long; the limit is {MAX_ID_LEN}",
            value.len()
        )));
    }
    if let Some((at, c)) = value
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(InvalidValue(format!(
            "has {c:?} at byte {at}; use only {ID_CHARSET} (at most {MAX_ID_LEN})"
        )));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Checks `value` against this type's rules.
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
                let value = value.into();
                let check: fn(&str) -> Result<(), InvalidValue> = $check;
                check(&value)?;
                Ok(Self(value))
            }

            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

string_id!(
    /// A tenant: `[A-Za-z0-9._:-]{1,128}`, and never `.` or `..` because it
    /// names a directory in the backup store.
    TenantId,
    |v| {
        check_id(v)?;
        if v == "." || v == ".." {
            return Err(InvalidValue(format!(
                "is {v:?}, which names a directory, not a tenant; use {ID_CHARSET}"
            )));
        }
        Ok(())
    }
);

string_id!(
    /// The recorder's id for a recording, unique per tenant: `[A-Za-z0-9._:-]{1,128}`.
    RecordingId,
    check_id
);

string_id!(
    /// A destination (as returned by `PutDestination`): `[A-Za-z0-9._:-]{1,128}`.
    DestinationId,
    check_id
);

string_id!(
    /// A plain file name, as the customer will see it in their bucket: at most
    /// 255 bytes, no `/` or `\`, no `..`, no control characters.
    FileName,
    |v| {
        if v.is_empty() {
            return Err(InvalidValue("is empty".to_owned()));
        }
        if v.len() > MAX_FILE_NAME_LEN {
            return Err(InvalidValue(format!(
                "is {} bytes long; the limit is {MAX_FILE_NAME_LEN}",
                v.len()
            )));
        }
        if let Some((at, c)) = v
            .char_indices()
            .find(|&(_, c)| c == '/' || c == '\\' || c.is_control())
        {
            return Err(InvalidValue(format!(
                "has {c:?} at byte {at}; send a plain file name without path separators or control characters"
            )));
        }
        if v.contains("..") {
            return Err(InvalidValue(
                "contains \"..\"; send a plain file name such as \"call-1234.mp4\"".to_owned(),
            ));
        }
        if v == "." {
            return Err(InvalidValue(
                "is \".\"; send a plain file name such as \"call-1234.mp4\"".to_owned(),
            ));
        }
        Ok(())
    }
);

string_id!(
    /// A media type such as `video/mp4`: `type/subtype[;params]` in visible
    /// ASCII, at most 255 bytes, because it becomes an HTTP `Content-Type` header.
    ContentType,
    |v| {
        if v.len() > MAX_CONTENT_TYPE_LEN {
            return Err(InvalidValue(format!(
                "is {} bytes long; the limit is {MAX_CONTENT_TYPE_LEN}",
                v.len()
            )));
        }
        if let Some((at, c)) = v
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_graphic() || c == ' '))
        {
            return Err(InvalidValue(format!(
                "has {c:?} at byte {at}; use a media type in plain ASCII such as \"video/mp4\""
            )));
        }
        let essence = v.split(';').next().unwrap_or_default().trim();
        match essence.split_once('/') {
            Some((t, s)) if !t.is_empty() && !s.is_empty() && !s.contains('/') => Ok(()),
            _ => Err(InvalidValue(format!(
                "is {v:?}, not a media type; send one such as \"video/mp4\", or leave it empty for {DEFAULT_CONTENT_TYPE}"
            ))),
        }
    }
);

impl ContentType {
    /// `application/octet-stream`, for recordings sent without a content type.
    pub fn octet_stream() -> Self {
        Self(DEFAULT_CONTENT_TYPE.to_owned())
    }
}

/// A job, named by a random UUID. The recording's backup object carries the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Uuid);

impl JobId {
    /// A fresh random id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses the hyphenated text form used on the wire.
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        Uuid::parse_str(value).map(Self).map_err(|_| {
            InvalidValue(format!(
                "is {value:?}, not a job id; job ids are UUIDs as returned by Upload"
            ))
        })
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl From<Uuid> for JobId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0.hyphenated())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_accept_the_charset_and_refuse_the_rest() {
        assert!(TenantId::parse("acme-corp_1:eu.west").is_ok());
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse("..").is_err());
        assert!(TenantId::parse("a/b").is_err());
        assert!(RecordingId::parse("x".repeat(MAX_ID_LEN)).is_ok());
        assert!(RecordingId::parse("x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(RecordingId::parse("caf\u{e9}").is_err());
    }

    #[test]
    fn file_names_are_plain() {
        assert!(FileName::parse("call 2024-05-01.mp4").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "..\\x",
            "a/b",
            "/etc/passwd",
            "a\\b",
            "\\x",
            "a\nb",
            "x..y",
            "nul\0",
            "\x01",
            "a\x1f",
            "del\x7f",
            "\u{85}",
        ] {
            assert!(FileName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(FileName::parse("n".repeat(MAX_FILE_NAME_LEN)).is_ok());
        assert!(FileName::parse("n".repeat(MAX_FILE_NAME_LEN + 1)).is_err());
        assert!(FileName::parse("\u{e9}".repeat(128)).is_err()); // 256 bytes
        // Whatever FileName accepts forms a key for every provider.
        for good in ["call.mp4", "a b.mp4", ".hidden", "x.", "caf\u{e9}.mp4"] {
            let name = FileName::parse(good).unwrap();
            assert!(
                crate::destination::object_key("p", name.as_str()).is_ok(),
                "{good:?}"
            );
        }
    }

    #[test]
    fn content_types() {
        assert!(ContentType::parse("video/mp4").is_ok());
        assert!(ContentType::parse("audio/ogg; codecs=opus").is_ok());
        assert!(ContentType::parse("mp4").is_err());
        assert!(ContentType::parse("video/mp4\r\nX-Evil: 1").is_err());
    }
}
