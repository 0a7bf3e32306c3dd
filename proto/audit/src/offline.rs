//! The offline `audit verify` and `audit export` commands, shared by `vaultd`
//! and `uploaderd` so both logs are checked and exported alike. Each service
//! only finds its database and key; everything here opens the log read-only
//! and never changes it.

use std::{io::Write, process::ExitCode};

use crate::{AuditError, AuditFilter, AuditKey, AuditStorage, export_jsonl};

/// Filters of `audit export`, as command-line flags (every set one must match).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ExportArgs {
    /// Only events of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only events of this client identity (URI SAN, e.g. spiffe://recvault.local/manager).
    #[arg(long)]
    pub identity: Option<String>,
    /// Only events about this credential.
    #[arg(long)]
    pub credential: Option<String>,
    /// Only events about this uploader job.
    #[arg(long)]
    pub job: Option<String>,
    /// Only events about this recording.
    #[arg(long)]
    pub recording: Option<String>,
}

impl ExportArgs {
    /// The store filter these flags select.
    pub fn filter(&self) -> AuditFilter {
        AuditFilter {
            tenant_id: self.tenant.clone(),
            identity: self.identity.clone(),
            credential_id: self.credential.clone(),
            job_id: self.job.clone(),
            recording_id: self.recording.clone(),
            ..AuditFilter::default()
        }
    }
}

/// `audit verify`: checks the chain in `storage` (and its anchor) under
/// `key`, writes one line for the operator to `out`, and returns the exit
/// status: success when intact, 1 when broken (the line names the first
/// broken sequence, or the anchor). `service` names who writes a missing
/// anchor on its next start.
pub fn verify(
    storage: AuditStorage,
    key: &AuditKey,
    service: &str,
    out: &mut impl Write,
) -> Result<ExitCode, String> {
    let reader = storage.reader();
    let anchored = reader.has_anchor();
    let report = crate::store::verify_anchored(&*reader, key, None).map_err(|e| e.to_string())?;
    let written = if report.ok {
        writeln!(
            out,
            "audit chain intact: {} events checked",
            report.events_checked
        )
        .and_then(|()| {
            if anchored {
                Ok(())
            } else {
                writeln!(
                    out,
                    "note: the log has no anchor, so a cut-off tail cannot be ruled out; \
                     the {service} writes one when it starts"
                )
            }
        })
    } else if report.first_broken_sequence == 0 {
        writeln!(
            out,
            "audit anchor BROKEN ({} events checked, chain intact): {}",
            report.events_checked, report.reason
        )
    } else {
        writeln!(
            out,
            "audit chain BROKEN at sequence {} ({} events checked): {}",
            report.first_broken_sequence, report.events_checked, report.reason
        )
    };
    written
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write the report: {e}"))?;
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `audit export`: every event in `storage` matching `args`, one JSON
/// object per line, to `out`. Returns how many were written. It does not
/// verify: run [`verify`] as well.
pub fn export(
    storage: AuditStorage,
    args: &ExportArgs,
    out: &mut impl Write,
) -> Result<u64, AuditError> {
    export_jsonl(storage, &args.filter(), out)
}
