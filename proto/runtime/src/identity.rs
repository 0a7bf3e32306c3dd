//! Who is calling: the identity of a verified peer certificate.
//!
//! Identity = the leaf certificate's URI SAN (SPIFFE style,
//! `spiffe://recvault.local/uploader`), else its first DNS SAN. The
//! certificate's SHA-256 fingerprint goes into audit events. This module only
//! reads certificates the TLS layer already verified; it grants nothing.

use std::fmt;

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The verified identity of the peer of one request.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SAN, else DNS SAN, of the leaf certificate.
    pub id: String,
    /// Lowercase hex SHA-256 of the leaf certificate (DER).
    pub cert_sha256: String,
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerIdentity({} sha256:{})", self.id, self.cert_sha256)
    }
}

/// Reads the identity from a leaf certificate. `None` when it has neither a
/// URI nor a DNS SAN (such a peer is treated as having no grant).
pub fn identity_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        })
}

/// Lowercase hex SHA-256 of a certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The peer's identity for a request served over [`crate::tls::incoming`].
/// `None` when the connection is not TLS or the certificate names no identity.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let leaf: &CertificateDer<'_> = certs.first()?;
    Some(PeerIdentity {
        id: identity_of_certificate(leaf)?,
        cert_sha256: fingerprint(leaf),
    })
}

/// The peer's fingerprint even when no identity could be read (for audit of denials).
pub fn peer_fingerprint<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    certs.first().map(|c| fingerprint(c))
}
