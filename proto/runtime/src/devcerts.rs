//! Development certificates: a throw-away CA and one certificate per recvault
//! identity, made with rcgen so nobody needs openssl by hand. Not for
//! production: deploy/ uses cert-manager there.
//!
//! Layout: `<dir>/ca.crt`, `<dir>/ca.key`, `<dir>/<identity>.crt`, `<dir>/<identity>.key`.
//! Every certificate carries the URI SAN `spiffe://<trust domain>/<identity>`;
//! all also carry DNS `localhost` and IP 127.0.0.1 so any of them can serve locally.

use std::{
    fs,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::tls::TlsFiles;

/// The trust domain of dev identities.
pub const TRUST_DOMAIN: &str = "recvault.local";

/// Every identity the product uses.
pub const IDENTITIES: [&str; 7] = [
    "vault",
    "uploader",
    "manager",
    "auditor",
    "admin",
    "recorder",
    // A manager scoped to the tenant `demo` only (the main job shows the scope).
    "manager-demo",
];

/// `spiffe://recvault.local/<name>`.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{name}")
}

/// Errors while making dev certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevCertError {
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// rcgen refused the parameters.
    #[error("cannot generate certificate for {name}: {reason}")]
    Generate { name: String, reason: String },
}

fn gen_err(name: &str) -> impl Fn(rcgen::Error) -> DevCertError + '_ {
    move |e| DevCertError::Generate {
        name: name.to_owned(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), DevCertError> {
    let err = |source| DevCertError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// The TLS files of `name` in a dev certificate directory.
pub fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join("ca.crt"),
    }
}

/// Creates a CA and a certificate for each of `names` in `dir` (created 0700),
/// replacing what is there.
pub fn generate(dir: &Path, names: &[&str]) -> Result<(), DevCertError> {
    fs::create_dir_all(dir).map_err(|source| DevCertError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate().map_err(gen_err("ca"))?;
    let ca_params = ca_params();
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err("ca"))?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    write(&dir.join("ca.crt"), &ca_cert.pem(), 0o644)?;
    let issuer = Issuer::new(ca_params, ca_key);
    for name in names {
        issue(dir, name, &issuer, None)?;
    }
    Ok(())
}

fn ca_params() -> CertificateParams {
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "recvault dev CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
}

/// Issues `<name>-expired.crt` and `.key`, valid only during 2020, from the CA
/// already in `dir`: for checking that an expired certificate is refused.
pub fn issue_expired(dir: &Path, name: &str) -> Result<TlsFiles, DevCertError> {
    let pem = fs::read_to_string(dir.join("ca.key")).map_err(|source| DevCertError::Write {
        path: dir.join("ca.key"),
        source,
    })?;
    let ca_key = KeyPair::from_pem(&pem).map_err(gen_err("ca"))?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let expired = format!("{name}-expired");
    issue(dir, &expired, &issuer, Some(name))?;
    Ok(files(dir, &expired))
}

/// Issues `file_name`'s certificate for the identity `identity` (default: the
/// file name); with `Some`, valid only during 2020 (expired).
fn issue(
    dir: &Path,
    file_name: &str,
    issuer: &Issuer<'_, KeyPair>,
    expired_identity: Option<&str>,
) -> Result<(), DevCertError> {
    let name = expired_identity.unwrap_or(file_name);
    let key = KeyPair::generate().map_err(gen_err(name))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::URI(spiffe_id(name).try_into().map_err(gen_err(name))?),
        SanType::DnsName("localhost".try_into().map_err(gen_err(name))?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ];
    if expired_identity.is_some() {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, issuer).map_err(gen_err(name))?;
    let f = files(dir, file_name);
    write(&f.key, &key.serialize_pem(), 0o600)?;
    write(&f.cert, &cert.pem(), 0o644)?;
    Ok(())
}

/// Makes the dev certificates unless every file is already there (a second run
/// reuses them). Returns true when it generated new ones.
pub fn ensure(dir: &Path) -> Result<bool, DevCertError> {
    let complete = dir.join("ca.crt").exists()
        && IDENTITIES.iter().all(|n| {
            let f = files(dir, n);
            f.cert.exists() && f.key.exists()
        });
    if complete {
        return Ok(false);
    }
    generate(dir, &IDENTITIES)?;
    Ok(true)
}
