//! Reading a backup back: its data key comes from the vault (`DataKeys/
//! UnwrapDataKey` over the same mTLS channel as leases), re-sealed to a key
//! pair made for that one call, and goes straight into locked, zeroizing
//! memory. [`open_backup`] turns a job's backup into a plaintext source, and
//! says whether a failure is the vault (retry), a refusal (keep the job), or
//! a backup that does not authenticate (never deliver it). Never caches a key.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use recvault_proto::vault::v1::UnwrapDataKeyRequest;
use recvault_runtime::hpke::OneCallKey;
use recvault_runtime::{datakey, logging::REQUEST_ID_HEADER, secret::SecretBytes};
use tonic::Code;

use crate::backup::format::Header;
use crate::backup::{BackupError, BackupStore, EncryptedSource};
use crate::destination::{FileSource, Source};
use crate::digest::FileDigest;
use crate::jobs::{Job, JobId};
use crate::lease::VaultLeases;

/// The vault did not give the data key back.
#[derive(Debug, thiserror::Error)]
#[error("the vault did not unwrap the backup's data key ({code:?}): {message}")]
pub struct DataKeyError {
    /// The vault's answer (or `Internal` when its reply did not open).
    pub code: Code,
    /// What it said; never key material.
    pub message: String,
}

impl DataKeyError {
    /// The vault is down, overloaded or timed out: the same request may work
    /// later. So is a vault that does not serve `DataKeys` yet (UNIMPLEMENTED:
    /// the uploader was upgraded first); the retry budget bounds the wait.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code,
            Code::Unimplemented
                | Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
        )
    }

    /// The vault says the wrapped key does not open for this tenant and
    /// recording (or names an unknown key version): the header was changed,
    /// or the vault's master key is not the one the backup was wrapped for.
    pub fn does_not_open(&self) -> bool {
        matches!(self.code, Code::InvalidArgument | Code::FailedPrecondition)
    }
}

impl VaultLeases {
    /// Asks the vault to unwrap `header`'s data key for `job_id`, `purpose`
    /// and `request_id` (all three audited by the vault). The key comes back
    /// sealed to a fresh X25519 key pair whose private half is wiped when
    /// this returns.
    pub async fn unwrap_data_key(
        &self,
        header: &Header,
        job_id: JobId,
        purpose: &str,
        request_id: &str,
    ) -> Result<SecretBytes, DataKeyError> {
        let local = |message: String| DataKeyError {
            code: Code::Internal,
            message,
        };
        let one_call = OneCallKey::generate()
            .map_err(|_| local("generating the one-call key pair failed".into()))?;
        let mut request = tonic::Request::new(UnwrapDataKeyRequest {
            tenant_id: header.tenant_id.clone(),
            recording_id: header.recording_id.clone(),
            key_version: header.key_version,
            enc: header.enc.to_vec(),
            wrapped_key: header.wrapped_key.to_vec(),
            recipient_public_key: one_call.public_key().to_vec(),
            purpose: purpose.to_owned(),
            job_id: job_id.to_string(),
        });
        request.set_timeout(Duration::from_secs(15));
        if let Ok(v) = request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
        let reply = self
            .data_keys
            .clone()
            .unwrap_data_key(request)
            .await
            .map_err(|s| DataKeyError {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        let key = one_call
            .open(
                datakey::RESEAL_INFO,
                &header.binding(),
                &reply.enc,
                &reply.sealed_key,
            )
            .map_err(|_| local("the vault's reply does not open with this call's key".into()))?;
        if key.len() != datakey::KEY_LEN {
            return Err(local(format!(
                "the vault returned a {}-byte data key, not 32",
                key.len()
            )));
        }
        Ok(key)
    }
}

/// Why a backup could not be opened for reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The vault could not be reached or answered with a transient error: retry later.
    #[error("{0}")]
    VaultUnavailable(DataKeyError),
    /// The vault refused for a reason that is not the backup (a missing
    /// grant, a wrapping key it does not have): retrying will not help.
    #[error("{0}")]
    Refused(String),
    /// The backup does not authenticate or does not belong to the job: it
    /// was modified. Never deliver it.
    #[error("{0}")]
    Corrupt(String),
    /// Reading the backup failed (I/O): may work later.
    #[error("{0}")]
    Io(String),
}

impl OpenError {
    /// The gRPC answer for a caller waiting on `job_id`'s backup
    /// (FetchBackup): the one mapping of these errors to a status.
    pub fn into_status(self, job_id: JobId) -> tonic::Status {
        use tonic::Status;
        let message = format!("backup of job {job_id}: {self}");
        match self {
            Self::VaultUnavailable(_) => Status::unavailable(message),
            Self::Refused(_) => Status::failed_precondition(message),
            Self::Corrupt(_) | Self::Io(_) => Status::data_loss(message),
        }
    }
}

/// A job's backup, ready to read as plaintext.
#[derive(Debug, Clone)]
pub enum BackupReader {
    /// Written encrypted; reads decrypt and authenticate.
    Encrypted(EncryptedSource),
    /// Written in clear by an uploader older than encryption at rest.
    Legacy(FileSource),
}

impl BackupReader {
    /// The plaintext, for a destination or FetchBackup.
    pub fn source(&self) -> Arc<dyn Source> {
        match self {
            Self::Encrypted(s) => Arc::new(s.clone()),
            Self::Legacy(s) => Arc::new(s.clone()),
        }
    }

    /// SHA-256, CRC-32 and size of the plaintext in one pass on the blocking
    /// pool. [`io::ErrorKind::InvalidData`] when a segment does not authenticate.
    pub async fn digest(&self) -> io::Result<FileDigest> {
        match self {
            Self::Encrypted(s) => s.digest().await,
            Self::Legacy(s) => crate::digest::hash_file_async(s.path()).await,
        }
    }
}

/// Opens `job`'s backup for `purpose` ("deliver", "fetch-backup"): reads the
/// header, checks it names the job's tenant and recording, has the vault
/// unwrap the data key, and authenticates the backup's last segment.
///
/// A backup without the RVBK magic is read in clear, with a warning, when the
/// job predates encryption (it has no stored-file SHA-256); for a job written
/// encrypted the missing magic means the file was changed. When the vault
/// says the wrapped key does not open, the stored file is re-hashed: changed
/// bytes are [`OpenError::Corrupt`], unchanged ones a vault that has not the
/// backup's wrapping key ([`OpenError::Refused`]).
pub async fn open_backup(
    backups: &BackupStore,
    vault: &VaultLeases,
    job: &Job,
    purpose: &str,
    request_id: &str,
) -> Result<BackupReader, OpenError> {
    let path = &job.backup_path;
    let header = match backups.read_header(path).await {
        Ok(Some(header)) => header,
        Ok(None) if job.stored_sha256.is_none() => {
            tracing::warn!(job_id = %job.job_id, path = %path.display(), "backup was written in clear by an older uploader; reading it unencrypted");
            return backups
                .open_legacy(path)
                .await
                .map(BackupReader::Legacy)
                .map_err(|e| OpenError::Io(e.to_string()));
        }
        Ok(None) => {
            return Err(OpenError::Corrupt(format!(
                "backup {} lost its RVBK header (it was written encrypted)",
                path.display()
            )));
        }
        Err(e @ BackupError::Format { .. }) => return Err(OpenError::Corrupt(e.to_string())),
        Err(e) => return Err(OpenError::Io(e.to_string())),
    };
    if header.tenant_id != job.tenant_id.as_str()
        || header.recording_id != job.recording_id.as_str()
    {
        return Err(OpenError::Corrupt(format!(
            "backup {} names tenant {:?} and recording {:?}, not the job's {} and {}: it was replaced",
            path.display(),
            header.tenant_id,
            header.recording_id,
            job.tenant_id,
            job.recording_id
        )));
    }
    let key = match vault
        .unwrap_data_key(&header, job.job_id, purpose, request_id)
        .await
    {
        Ok(key) => key,
        Err(e) if e.is_transient() => return Err(OpenError::VaultUnavailable(e)),
        Err(e) if e.does_not_open() => {
            return Err(match backups.rehash(path).await {
                Ok((sha, _)) if Some(sha) == job.stored_sha256 => OpenError::Refused(format!(
                    "{e}, although backup {} is byte for byte as stored; is the vault running with \
                     the master key this backup was wrapped for (key_version {})?",
                    path.display(),
                    header.key_version
                )),
                Ok((sha, _)) => OpenError::Corrupt(format!(
                    "{e}: backup {} was modified (stored SHA-256 is now {sha})",
                    path.display()
                )),
                Err(read) => OpenError::Io(format!("{e}; re-reading the backup failed: {read}")),
            });
        }
        Err(e) => return Err(OpenError::Refused(e.to_string())),
    };
    match backups.open_encrypted(path, header, key).await {
        Ok(source) => Ok(BackupReader::Encrypted(source)),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(OpenError::Corrupt(e.to_string())),
        Err(e) => Err(OpenError::Io(format!(
            "reading backup {}: {e}",
            path.display()
        ))),
    }
}
