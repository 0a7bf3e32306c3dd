//! `Debug` for the messages that carry plaintext secrets, so a stray `{:?}`
//! in a log line, panic or test snapshot shows the secret's length, never its bytes.

use std::fmt;

use crate::vault::v1::{AcquireLeaseResponse, PutCredentialRequest};

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[REDACTED; {} bytes]", self.0)
    }
}

impl fmt::Debug for PutCredentialRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutCredentialRequest")
            .field("tenant_id", &self.tenant_id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("secret", &Redacted(self.secret.len()))
            .field("labels", &self.labels)
            .field("sealed_secret", &self.sealed_secret.len())
            .field("sealing_key_version", &self.sealing_key_version)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AcquireLeaseResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcquireLeaseResponse")
            .field("lease_id", &self.lease_id)
            .field("secret", &Redacted(self.secret.len()))
            .field("expires_at", &self.expires_at)
            .field("kind", &self.kind)
            .field("credential_version", &self.credential_version)
            .field("sealed_secret", &self.sealed_secret.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_bearing_messages_never_print_the_secret() {
        let secret = b"hunter2-plaintext".to_vec();
        let put = PutCredentialRequest {
            tenant_id: "acme".into(),
            secret: secret.clone(),
            ..Default::default()
        };
        let lease = AcquireLeaseResponse {
            lease_id: "lease_1".into(),
            secret,
            ..Default::default()
        };
        for shown in [format!("{put:?}"), format!("{lease:#?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            // Nor as the derived Debug would show bytes: [104, 117, ...].
            assert!(!shown.contains("104, 117"), "{shown}");
            assert!(shown.contains("REDACTED; 17 bytes"), "{shown}");
        }
        assert!(format!("{put:?}").contains("acme"));
    }
}
