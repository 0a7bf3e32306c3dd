//! Typed identifiers with one validation rule each, so handlers cannot mix a
//! tenant id with a credential id and every error names the field.

use std::fmt;

/// Checks a client-supplied identifier: non-empty, at most `max` bytes, and
/// only `[A-Za-z0-9._:-]`. Errors name the field and say what to do.
pub fn check_token(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is required"));
    }
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes; the limit is {max}",
            value.len()
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(format!(
            "{field} contains {bad:?}; use letters, digits, '.', '_', ':' or '-'"
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates a client-supplied value.
            pub fn parse(value: &str) -> Result<Self, String> {
                check_token($field, value, $max)?;
                Ok(Self(value.to_owned()))
            }
            /// Wraps a value read back from our own database.
            #[allow(dead_code)]
            pub(crate) fn from_trusted(value: String) -> Self {
                Self(value)
            }
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
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

id_type!(
    /// A customer tenant.
    TenantId, "tenant_id", 128
);
id_type!(
    /// A stored credential (`cred_<uuid>`).
    CredentialId, "credential_id", 128
);
id_type!(
    /// A lease on a credential's plaintext (`lease_<uuid>`).
    LeaseId, "lease_id", 128
);

impl CredentialId {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(format!("cred_{}", uuid::Uuid::new_v4().simple()))
    }
}

impl LeaseId {
    /// A fresh random id (122 random bits: unguessable).
    pub fn generate() -> Self {
        Self(format!("lease_{}", uuid::Uuid::new_v4().simple()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_long_and_odd_characters() {
        assert!(TenantId::parse("demo").is_ok());
        assert_eq!(
            TenantId::parse("").expect_err("must be refused"),
            "tenant_id is required"
        );
        assert!(
            TenantId::parse(&"a".repeat(129))
                .expect_err("must be refused")
                .contains("limit is 128")
        );
        assert!(
            CredentialId::parse("a/b")
                .expect_err("must be refused")
                .contains("credential_id contains '/'")
        );
    }
}
