//! What every recvault store on PostgreSQL shares: the `database_url_file`
//! (a `postgresql://` URL in an owner-only file, its password never shown),
//! TLS through rustls with aws-lc-rs (`sslmode=verify-full`), a small pool of
//! blocking clients, migrations applied once under an advisory lock, and the
//! backend-neutral error kinds a store maps its own errors from.
//!
//! Timeouts: connecting 5 s, a statement 15 s, a lock 10 s, a free pool
//! connection 10 s. A database that is down answers [`PgError::Unavailable`]
//! with the reason after at most the connect timeout; the pool drops broken
//! connections and opens new ones, so a service recovers by itself.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

pub use postgres::{
    Client, Error, IsolationLevel, Row, RowIter, Transaction, fallible_iterator::FallibleIterator,
    types,
};
use postgres::{NoTls, error::SqlState};

/// What went wrong, in kinds a handler can act on; the text never holds the
/// URL or its password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// The database cannot be reached or refused the work: retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Another writer won (unique key, serialization failure, deadlock).
    #[error("{0}")]
    Conflict(String),
    /// The database reports damaged data.
    #[error("{0}")]
    Corrupt(String),
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_WAIT: Duration = Duration::from_secs(10);
const POOL_MAX: usize = 16;
/// Longest URL file accepted.
const URL_MAX: usize = 4096;

/// How to reach the database, read from a `postgresql://` URL. The password
/// stays inside the driver's config; `Debug` never shows it.
pub struct PgTarget {
    config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Host, port and database, for messages (never the password).
    display: String,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget")
            .field("database", &self.display)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a database URL was refused. Never holds the URL (it has a password).
fn url_error(file: &Path, message: impl fmt::Display) -> PgError {
    PgError::Unavailable(format!("database_url_file {}: {message}", file.display()))
}

impl PgTarget {
    /// Reads the URL from `file` (owner-only, like every key file) and
    /// parses it. `sslmode` is `disable` or `verify-full` (the default when
    /// absent is `verify-full`); `sslrootcert` names a PEM CA bundle
    /// (relative paths resolve against the URL file's directory).
    pub fn from_url_file(file: &Path, application: &str) -> Result<Self, PgError> {
        use recvault_runtime::secret::{PrivateFileError, read_private_file};
        let (secret, len) = read_private_file(file, URL_MAX).map_err(|e| match e {
            PrivateFileError::Io(e) => url_error(file, format!("cannot be read ({e})")),
            PrivateFileError::NotAFile => url_error(file, "is not a regular file"),
            PrivateFileError::Permissions(mode) => url_error(
                file,
                format!("has mode {mode:o}: it holds a password, so only its owner may read it (chmod 600)"),
            ),
        })?;
        if len > URL_MAX {
            return Err(url_error(file, format!("is longer than {URL_MAX} bytes")));
        }
        let url = std::str::from_utf8(&secret.expose_secret()[..len])
            .map_err(|_| url_error(file, "is not UTF-8"))?
            .trim();
        Self::parse(url, file, application)
    }

    fn parse(url: &str, file: &Path, application: &str) -> Result<Self, PgError> {
        if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
            return Err(url_error(
                file,
                "must hold one postgresql:// URL (postgresql://user:password@host:port/database)",
            ));
        }
        // tokio-postgres knows only disable/prefer/require: take sslmode and
        // sslrootcert out and do verification ourselves.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut sslmode, mut rootcert, mut rest) = (None, None, Vec::new());
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => rootcert = Some(PathBuf::from(v)),
                _ => rest.push(pair),
            }
        }
        let driver_url = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = postgres::Config::from_str(&driver_url)
            .map_err(|e| url_error(file, format!("is not a valid PostgreSQL URL ({e})")))?;
        let tls = match sslmode.as_deref().unwrap_or("verify-full") {
            "disable" => None,
            "verify-full" => {
                let rootcert = rootcert.ok_or_else(|| {
                    url_error(
                        file,
                        "sslmode=verify-full needs sslrootcert=<PEM CA file> in the URL \
                         (or sslmode=disable on a trusted loopback)",
                    )
                })?;
                let rootcert = if rootcert.is_relative() {
                    file.parent().unwrap_or(Path::new(".")).join(rootcert)
                } else {
                    rootcert
                };
                config.ssl_mode(postgres::config::SslMode::Require);
                Some(rustls_connector(&rootcert).map_err(|e| url_error(file, e))?)
            }
            other => {
                return Err(url_error(
                    file,
                    format!(
                        "sslmode={other} is not supported: use verify-full (with sslrootcert) \
                         or disable"
                    ),
                ));
            }
        };
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(Duration::from_secs(15))
            .keepalives_idle(Duration::from_secs(30))
            .options("-c statement_timeout=15000 -c lock_timeout=10000")
            .application_name(application);
        let host = config
            .get_hosts()
            .first()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_default();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let display = format!("{host}:{port}/{}", config.get_dbname().unwrap_or_default());
        Ok(Self {
            config,
            tls,
            display,
        })
    }

    /// Host, port and database, for messages and logs (never the password).
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Opens one client (blocking), outside any pool: for a connection a
    /// service holds on its own, such as a `LISTEN` or a writer's lock.
    pub fn connect(&self) -> Result<Client, PgError> {
        let connected = match &self.tls {
            None => self.config.connect(NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        };
        connected.map_err(|e| {
            PgError::Unavailable(format!(
                "cannot connect to PostgreSQL at {}: {e}",
                self.display
            ))
        })
    }
}

/// A rustls connector trusting the CAs in `rootcert` and checking the
/// server's name (verify-full).
fn rustls_connector(rootcert: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let pem = std::fs::read(rootcert)
        .map_err(|e| format!("cannot read sslrootcert {}: {e}", rootcert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", rootcert.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: {e}", rootcert.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "sslrootcert {} holds no PEM certificate",
            rootcert.display()
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl From<postgres::Error> for PgError {
    fn from(error: postgres::Error) -> Self {
        let code = error.code().cloned();
        match code {
            Some(c) if c == SqlState::UNIQUE_VIOLATION => PgError::Conflict(error.to_string()),
            Some(c) if c == SqlState::DATA_CORRUPTED || c == SqlState::INDEX_CORRUPTED => {
                PgError::Corrupt(error.to_string())
            }
            Some(c)
                if c == SqlState::T_R_SERIALIZATION_FAILURE
                    || c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                PgError::Conflict(error.to_string())
            }
            _ => PgError::Unavailable(format!("PostgreSQL: {error}")),
        }
    }
}

/// An idle client older than this is checked before use.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(5);
/// How long that check may take.
const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A few connections, opened on demand, broken ones dropped.
pub struct Pool {
    target: PgTarget,
    /// Idle clients with when they were returned, and how many are open.
    idle: Mutex<(Vec<(Client, Instant)>, usize)>,
    freed: Condvar,
}

/// A pooled connection, returned on drop (unless it broke).
pub struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        match self.client.take() {
            Some(client) if !client.is_closed() => idle.0.push((client, Instant::now())),
            _ => idle.1 -= 1,
        }
        self.pool.freed.notify_one();
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Conn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing a client blocks on its own runtime, which panics on an
        // async thread (where the vault's last handle may be dropped at
        // shutdown): close them on a thread of their own.
        let idle = std::mem::take(&mut self.idle.get_mut().unwrap_or_else(|p| p.into_inner()).0);
        if idle.is_empty() {
            return;
        }
        let closing = std::thread::Builder::new()
            .name("pg-pool-close".into())
            .spawn(move || drop(idle));
        if let Ok(closing) = closing {
            let _ = closing.join();
        }
    }
}

impl Pool {
    /// An empty pool; connections open on first use.
    pub fn new(target: PgTarget) -> Self {
        Self {
            target,
            idle: Mutex::new((Vec::new(), 0)),
            freed: Condvar::new(),
        }
    }

    /// Where the pool connects.
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// A connection: an idle one, a new one while fewer than 16 are open, or
    /// the next one freed (at most 10 s).
    pub fn get(&self) -> Result<Conn<'_>, PgError> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((mut client, since)) = idle.0.pop() {
                // A client idle for a while may have lost its server (a
                // restart, a failover): check it before handing it out, so
                // the first call after an outage does not fail on it.
                if client.is_closed()
                    || (since.elapsed() >= IDLE_CHECK_AFTER && {
                        drop(idle);
                        let dead = client.is_valid(IDLE_CHECK_TIMEOUT).is_err();
                        idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                        dead
                    })
                {
                    idle.1 -= 1;
                    continue;
                }
                return Ok(Conn {
                    pool: self,
                    client: Some(client),
                });
            }
            if idle.1 < POOL_MAX {
                idle.1 += 1;
                drop(idle);
                return match self.target.connect() {
                    Ok(client) => Ok(Conn {
                        pool: self,
                        client: Some(client),
                    }),
                    Err(e) => {
                        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                        idle.1 -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PgError::Unavailable(format!(
                    "all {POOL_MAX} PostgreSQL connections stayed busy for {}s",
                    POOL_WAIT.as_secs()
                )));
            }
            idle = self
                .freed
                .wait_timeout(idle, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Follows `channel` on a connection of its own, from a thread named `name`:
/// `on_batch` gets the payloads of the notifications that arrived together
/// (empty after `poll` passed without one, so the caller can also poll for
/// what it may have missed). A broken connection is reopened (after `poll`);
/// notifications sent while it was down are lost, which callers cover by
/// re-reading on the empty batches. Stops within `poll` of `stop`.
pub fn listen(
    name: &str,
    pool: std::sync::Arc<Pool>,
    channel: &'static str,
    poll: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut on_batch: impl FnMut(Vec<String>) + Send + 'static,
) -> std::io::Result<()> {
    use postgres::fallible_iterator::FallibleIterator as _;
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let mut listener: Option<Client> = None;
            while !stop.load(Ordering::Relaxed) {
                let Some(client) = listener.as_mut().filter(|c| !c.is_closed()) else {
                    listener = pool.target().connect().ok().and_then(|mut c| {
                        c.batch_execute(&format!("LISTEN {channel}"))
                            .ok()
                            .map(|()| c)
                    });
                    if listener.is_none() {
                        std::thread::sleep(poll);
                    }
                    continue;
                };
                // Wait for one notification (or `poll`), then take whatever
                // else is already pending.
                let mut payloads = Vec::new();
                let mut notes = client.notifications();
                let first = notes.timeout_iter(poll).next();
                let broken = match first {
                    Ok(Some(n)) => {
                        payloads.push(n.payload().to_owned());
                        let mut pending = notes.iter();
                        while let Ok(Some(n)) = pending.next() {
                            payloads.push(n.payload().to_owned());
                        }
                        false
                    }
                    Ok(None) => false,
                    Err(_) => true,
                };
                drop(notes);
                if broken {
                    listener = None;
                }
                on_batch(payloads);
            }
        })
        .map(drop)
}

/// Applies the `migrations` (version, SQL) that `table` does not list yet, in
/// one transaction under an advisory lock, so replicas starting at once
/// never both apply one. Each component keeps its own table (the vault's
/// stores `schema_migrations`, the audit log `audit_schema_migrations`).
pub fn migrate(pool: &Pool, table: &str, migrations: &[(i64, &str)]) -> Result<(), PgError> {
    /// Key of the advisory lock taken while migrating: "recvault".
    const MIGRATION_LOCK: i64 = 0x7265_6376_6175_6c74;
    let mut conn = pool.get()?;
    let mut tx = conn.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             version    BIGINT PRIMARY KEY,
             applied_at BIGINT NOT NULL
         )"
    ))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    for (version, sql) in migrations {
        let seen = tx
            .query_opt(
                &format!("SELECT version FROM {table} WHERE version = $1"),
                &[version],
            )?
            .is_some();
        if !seen {
            tx.batch_execute(sql)?;
            tx.execute(
                &format!("INSERT INTO {table} (version, applied_at) VALUES ($1, $2)"),
                &[version, &now],
            )?;
            tracing::info!(table, version, "PostgreSQL migration applied");
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<PgTarget, String> {
        PgTarget::parse(url, Path::new("/etc/recvault/db.url"), "test").map_err(|e| e.to_string())
    }

    #[test]
    fn urls_are_checked_and_never_echoed() {
        let t = parse("postgresql://vault:hunter2secret@db.internal:5433/recvault?sslmode=disable")
            .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{t:?}");
        assert!(shown.contains("db.internal:5433/recvault"), "{shown}");
        assert!(!shown.contains("hunter2secret"), "{shown}");

        for (url, says) in [
            ("mysql://x@h/d", "postgresql:// URL"),
            ("postgresql://vault:hunter2secret@h/d", "sslrootcert"),
            (
                "postgresql://vault:hunter2secret@h/d?sslmode=require",
                "sslmode=require is not supported",
            ),
            (
                "postgresql://vault:hunter2secret@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                "cannot read sslrootcert",
            ),
            (
                "postgresql://vault:hunter2secret@h/d?sslmode=disable&bogus=1",
                "not a valid PostgreSQL URL",
            ),
        ] {
            let err = parse(url).map(|_| ()).expect_err(url);
            assert!(err.contains(says), "{url}: {err}");
            assert!(
                err.contains("database_url_file /etc/recvault/db.url"),
                "{err}"
            );
            assert!(!err.contains("hunter2secret"), "{err}");
        }
    }
}
