//! A real PostgreSQL server for the tests: Debian's `postgresql` binaries,
//! one server per test process on a free loopback port (socket in its own
//! temp directory), one fresh database per test. The server refuses to run
//! as root, so as root it runs as the unprivileged system user
//! `recvault-pg` (created when missing). A watchdog stops it when the test
//! process exits, however it exits.
//!
//! Where PostgreSQL is not installed, [`Postgres::shared`] returns `None`
//! after printing why (install: `apt-get install -y postgresql`); under
//! `CI=true` a missing server is a failure, not a skip.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// The system user the server runs as when the tests run as root.
const PG_USER: &str = "recvault-pg";
/// The database role the tests connect as (trust authentication on loopback).
pub const ROLE: &str = "recvault";

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    root: bool,
    data: PathBuf,
    port: u16,
    // Kept for the server's lifetime (data directory and socket).
    _dir: tempfile::TempDir,
    // Stops the server once this process is gone (never waited on: it
    // outlives the process by design).
    _watchdog: std::process::Child,
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    pub port: u16,
}

impl Database {
    /// `postgresql://` URL of this database (no password: trust on loopback).
    pub fn url(&self) -> String {
        format!(
            "postgresql://{ROLE}@127.0.0.1:{}/{}?sslmode=disable",
            self.port, self.name
        )
    }

    /// Writes [`Self::url`] to `dir/database.url`, owner-only, as a
    /// `database_url_file` must be, and returns its path.
    pub fn url_file(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let file = dir.join("database.url");
        std::fs::write(&file, self.url()).expect("write the database URL file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
            .expect("make the database URL file owner-only");
        file
    }
}

/// The newest installed `/usr/lib/postgresql/<version>/bin` with `postgres`.
fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `cmd` as the server's user (through runuser when root).
fn as_pg_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Postgres {
    /// The test process's server, started on first use; `None` (with the
    /// reason printed) where PostgreSQL is not installed and not in CI.
    pub fn shared() -> Option<&'static Postgres> {
        static SERVER: OnceLock<Option<Postgres>> = OnceLock::new();
        SERVER
            .get_or_init(|| match find_bin() {
                Some(bin) => Some(Postgres::start(bin)),
                None if std::env::var_os("CI").is_some_and(|v| v == "true") => panic!(
                    "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); \
                     .ci/run installs it with apt-get install -y postgresql"
                ),
                None => {
                    eprintln!(
                        "skipping the PostgreSQL tests: PostgreSQL is not installed \
                         (apt-get install -y postgresql)"
                    );
                    None
                }
            })
            .as_ref()
    }

    /// A server of the caller's own (to stop and start again: outage
    /// tests); `None` as for [`Postgres::shared`].
    pub fn dedicated() -> Option<Postgres> {
        Postgres::shared()?;
        find_bin().map(Postgres::start)
    }

    /// Stops the server now (`pg_ctl stop -m immediate`: as a crash would).
    pub fn stop(&self) {
        let mut pg_ctl = as_pg_user(self.root, &self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(pg_ctl, "pg_ctl stop");
    }

    /// Starts the stopped server again on the same port.
    pub fn start_again(&self) {
        self.pg_ctl_start();
        self.wait_ready();
    }

    fn pg_ctl_start(&self) {
        let dir = self.data.parent().unwrap_or(Path::new("/"));
        let mut pg_ctl = as_pg_user(self.root, &self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -h 127.0.0.1 -c fsync=off -c max_connections=200",
                self.port,
                dir.display()
            ))
            .args(["-w", "-t", "60", "start"]);
        run(pg_ctl, "pg_ctl start");
    }

    fn start(bin: PathBuf) -> Postgres {
        let root = is_root();
        if root {
            let exists = Command::new("id")
                .arg(PG_USER)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !exists {
                // Concurrent test processes may race here; a second useradd
                // fails with "already exists", which is fine.
                let _ = Command::new("useradd")
                    .args([
                        "--system",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                    ])
                    .arg(PG_USER)
                    .status();
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("recvault-pg-")
            .tempdir()
            .expect("temp dir");
        let data = dir.path().join("data");
        if root {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg(format!("{PG_USER}:")).arg(dir.path());
                    c
                },
                "chown the PostgreSQL directory",
            );
        }
        let mut initdb = as_pg_user(root, &bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", ROLE, "--auth=trust", "--no-sync", "-E", "UTF8"]);
        run(initdb, "initdb");
        let port = free_port();
        // Stop the server when this process ends, however it ends.
        // (As this process's user, so that `kill -0` may probe it.)
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {sudo}{pg_ctl} -D {data} stop -m immediate; rm -rf {dir}",
            pid = std::process::id(),
            sudo = if root {
                format!("runuser -u {PG_USER} -- ")
            } else {
                String::new()
            },
            pg_ctl = bin.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.path().display()
        );
        let watchdog = Command::new("/bin/sh")
            .args(["-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the PostgreSQL watchdog");
        let server = Postgres {
            bin,
            root,
            data,
            port,
            _dir: dir,
            _watchdog: watchdog,
        };
        server.pg_ctl_start();
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new, empty database.
    pub fn database(&self) -> Database {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
            .arg(&name);
        run(createdb, "createdb");
        Database {
            name,
            port: self.port,
        }
    }

    /// Runs SQL in `db` with psql (for tests that inspect or damage rows).
    pub fn psql(&self, db: &Database, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
            .args(["-d", &db.name, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A dedicated server ends with its owner (the shared one lives in a
        // static and is stopped by its watchdog).
        let _ = as_pg_user(self.root, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
