//! Test harness: every test gets its own SoftHSM2 token (in a temporary
//! folder with its own SOFTHSM2_CONF, made by `keyhavend dev`), its own real
//! daemon process on its own socket, and stops what it started. Nothing here
//! mocks the token, the store, the crypto or the socket.
//!
//! Run through `cargo test --workspace`, which builds the `keyhavend` and
//! `keyhaven` binaries this harness starts.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use keyhaven::{Client, EncryptionContext, ErrorCode, KeyPath};

/// Path of a workspace binary (`keyhavend`, `keyhaven`) next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so that it is built",
        path.display()
    );
    path
}

/// The SoftHSM2 module on this machine.
pub fn softhsm_module() -> PathBuf {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 is not installed: run softhsm/test, which installs it")
}

/// A running `keyhavend dev` in its own temporary folder.
pub struct TestDaemon {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// `keyhavend dev --postgres URL`: the store is that database.
    postgres: Option<String>,
    /// `keyhavend dev --join DIR`: another node of DIR's cluster.
    join: Option<PathBuf>,
    /// The network namespace the daemon runs in (`ip netns exec NAME`),
    /// from its next start on ([`TestDaemon::run_in_netns`]).
    netns: Option<String>,
}

impl TestDaemon {
    /// Creates a fresh dev install (token, master key, store) and starts it.
    pub fn start() -> TestDaemon {
        let dir = tempfile::Builder::new().prefix("keyhaven-test-").tempdir().expect("temp dir");
        let socket = dir.path().join("keyhaven.sock");
        let mut d =
            TestDaemon { dir, socket, child: None, stderr: None, postgres: None, join: None, netns: None };
        d.spawn();
        d
    }

    /// As [`TestDaemon::start`], with the store in PostgreSQL database
    /// `url` (`keyhavend dev --postgres URL`).
    pub fn start_postgres(url: &str) -> TestDaemon {
        let dir = tempfile::Builder::new().prefix("keyhaven-test-").tempdir().expect("temp dir");
        let socket = dir.path().join("keyhaven.sock");
        let mut d = TestDaemon {
            dir,
            socket,
            child: None,
            stderr: None,
            postgres: Some(url.to_owned()),
            join: None,
            netns: None,
        };
        d.spawn();
        d
    }

    /// Another node of `first`'s cluster (a daemon on PostgreSQL):
    /// `keyhavend dev --dir NEW --join FIRST`, sharing its token and
    /// database, with its own socket and node name (the folder's name).
    pub fn join(first: &TestDaemon) -> TestDaemon {
        let dir = tempfile::Builder::new().prefix("keyhaven-node-").tempdir().expect("temp dir");
        let socket = dir.path().join("keyhaven.sock");
        let join = Some(first.dir().to_owned());
        let mut d = TestDaemon { dir, socket, child: None, stderr: None, postgres: None, join, netns: None };
        d.spawn();
        d
    }

    /// Kills the daemon (SIGKILL: no drain, nothing given back) and reaps
    /// it; [`TestDaemon::start_again`] starts it again.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The dev folder (token, config, store, socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The store folder.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// From the next start on, runs the daemon in network namespace
    /// `netns` (`ip netns exec NETNS keyhavend …`, which execs the daemon
    /// itself: [`TestDaemon::pid`] is the daemon's); `None`: in the test's.
    /// Its socket is a file, which the test reaches from any namespace.
    pub fn run_in_netns(&mut self, netns: Option<&str>) {
        self.netns = netns.map(str::to_owned);
    }

    fn spawn(&mut self) {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(ip_tool());
                c.args(["netns", "exec", ns]).arg(bin("keyhavend"));
                c
            }
            None => Command::new(bin("keyhavend")),
        };
        let mut child = command
            .args(["dev", "--dir"])
            .arg(self.dir.path())
            .args(self.postgres.iter().flat_map(|url| ["--postgres", url]))
            .args(self.join.iter().flat_map(|dir| [std::ffi::OsStr::new("--join"), dir.as_os_str()]))
            .env("KEYHAVEN_LOG", std::env::var("KEYHAVEN_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start keyhavend");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        self.stderr = Some(std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
            }
            all
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with("export KEYHAVEN_SOCKET=") => {
                    assert_eq!(line, format!("export KEYHAVEN_SOCKET={}", self.socket.display()));
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("wait") {
                        let log = self.stderr.take().unwrap().join().unwrap_or_default();
                        panic!("keyhavend exited with {status} before listening:\n{log}");
                    }
                    assert!(Instant::now() < deadline, "keyhavend did not start within 60 s");
                }
            }
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the status and the log.
    pub fn stop(&mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("daemon running");
        signal(child.id(), "TERM");
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        let log = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        (status, log)
    }

    /// Starts the daemon again on the same folder after [`stop`](Self::stop),
    /// so that a test can look at the stopped store in between.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "keyhavend is still running");
        self.spawn();
    }

    /// Stops the daemon (cleanly) and starts it again on the same folder.
    pub fn restart(&mut self) {
        self.restart_with(|_| {});
    }

    /// Stops the daemon, lets `change` edit its folder (the config is
    /// `keyhaven.toml`), and starts it again.
    pub fn restart_with(&mut self, change: impl FnOnce(&Path)) {
        let (status, log) = self.stop();
        assert!(status.success(), "keyhavend exited with {status}:\n{log}");
        change(self.dir.path());
        self.spawn();
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connect to the test daemon")
    }

    /// Runs `keyhavend run` on this folder's config while the test daemon
    /// is stopped, to its end (for start-ups that must fail).
    pub fn run_once(&self) -> Output {
        Command::new(bin("keyhavend"))
            .args(["run", "--config"])
            .arg(self.dir().join("keyhaven.toml"))
            .env_remove("SOFTHSM2_CONF")
            .output()
            .expect("run keyhavend")
    }

    /// Runs `keyhavend accept-store --reason REASON` on this folder while
    /// the test daemon is stopped (an operator who restored a backup on
    /// purpose), and asserts that it succeeded.
    pub fn accept_store(&self, reason: &str) -> String {
        let out = Command::new(bin("keyhavend"))
            .args(["accept-store", "--reason", reason, "--config"])
            .arg(self.dir().join("keyhaven.toml"))
            .env_remove("SOFTHSM2_CONF")
            .output()
            .expect("run keyhavend accept-store");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "accept-store failed: {text}");
        text
    }

    /// Runs the `keyhaven` CLI against this daemon with `stdin` as input.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_cli(&self.socket, args, stdin)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `keyhaven` CLI with `--socket socket`.
pub fn run_cli(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    run_cli_cmd(Command::new(bin("keyhaven")), socket, args, stdin)
}

/// Runs the `keyhaven` CLI as `user` (its uid and primary gid; the daemon
/// finds the supplementary groups itself).
pub fn run_cli_as(user: &TestUser, socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin("keyhaven"));
    cmd.uid(user.uid).gid(user.gid).current_dir("/");
    run_cli_cmd(cmd, socket, args, stdin)
}

fn run_cli_cmd(mut cmd: Command, socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = cmd
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("KEYHAVEN_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyhaven");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("keyhaven output");
    let _ = writer.join();
    out
}

/// A system user made for the tests.
#[derive(Clone, Debug)]
pub struct TestUser {
    /// User name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

/// `(id, fields)` of a `getent DB NAME` entry, if any.
fn getent(db: &str, name: &str) -> Option<Vec<String>> {
    let out = Command::new("getent").args([db, name]).output().expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).lines().next()?.to_owned();
    out.status.success().then(|| line.split(':').map(str::to_owned).collect())
}

/// Runs a user-database command (`groupadd`, `useradd`, `usermod`),
/// retrying while another process holds the lock on /etc/passwd or
/// /etc/group (tests run in parallel, in several processes). Success
/// and "exists already" both count as done.
fn user_db(cmd: &str, args: &[&str], done: impl Fn() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
        if out.status.success() || done() {
            return;
        }
        // 10: cannot lock; 9: exists (a parallel test made it meanwhile).
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{cmd} {args:?} did not succeed");
}

/// The gid of group `name`, creating the group when missing. Idempotent
/// and safe to call from parallel tests. Tests run as root (CI does).
pub fn ensure_group(name: &str) -> u32 {
    user_db("groupadd", &[name], || getent("group", name).is_some());
    getent("group", name).and_then(|f| f.get(2)?.parse().ok()).expect("gid")
}

/// The user `name` (with a group of its own name as primary group and
/// `groups` as supplementary groups), creating it or adding the groups
/// when missing. Idempotent and safe to call from parallel tests.
pub fn ensure_user(name: &str, groups: &[&str]) -> TestUser {
    for g in groups {
        ensure_group(g);
    }
    let exists = || getent("passwd", name).is_some();
    let mut args = vec!["-M", "-U", "-s", "/usr/sbin/nologin"];
    let list = groups.join(",");
    if !groups.is_empty() {
        args.extend(["-G", &list]);
    }
    args.push(name);
    user_db("useradd", &args, exists);
    for g in groups {
        let member =
            || getent("group", g).is_some_and(|f| f.get(3).is_some_and(|m| m.split(',').any(|u| u == name)));
        user_db("usermod", &["-a", "-G", g, name], member);
    }
    let f = getent("passwd", name).expect("user exists");
    TestUser { name: name.to_owned(), uid: f[2].parse().expect("uid"), gid: f[3].parse().expect("gid") }
}

impl TestDaemon {
    /// Replaces the policy of the config with `rules` (TOML
    /// `[[policy.rules]]` tables) and lets every local user reach the
    /// socket (`socket_mode = 0o666`, the folder traversable), so that the
    /// policy is the only gate. Takes effect at the next start or reload.
    pub fn write_policy(&self, rules: &str) {
        use std::os::unix::fs::PermissionsExt;
        let file = self.dir().join("keyhaven.toml");
        let text = std::fs::read_to_string(&file).expect("config");
        let mut text = match text.find("[[policy.rules]]") {
            Some(at) => text[..at].to_owned(),
            None => text,
        };
        if !text.contains("socket_mode") {
            let at = text.find("\nstore = ").expect("store line") + 1;
            text.insert_str(at, "socket_mode = 0o666\n");
        }
        text.push_str(rules);
        std::fs::write(&file, text).expect("write config");
        std::fs::set_permissions(self.dir(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    }
}

/// Sends a signal (`TERM`, `KILL`, `HUP`…) to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The uid this test process runs as (the owner of `/proc/self`).
pub fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").expect("/proc/self").uid()
}

/// Parses a `key=value` list into a context.
pub fn ctx(pairs: &[&str]) -> EncryptionContext {
    EncryptionContext::from_pairs(pairs).expect("valid context")
}

/// Parses `tenant/key`.
pub fn path(s: &str) -> KeyPath {
    s.parse().expect("valid key path")
}

/// Reads every file below `dir` (for scanning the store for secrets).
pub fn read_all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

/// True when `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

/// Opens a stopped daemon's sled store to read or edit it by hand. Without
/// sled's background flusher, so that the file lock goes with the handle
/// (a daemon started right after must not find it held). A handle this
/// process dropped just before may hold the lock for a moment longer (sled
/// lets go of it when its last internal reference goes): the open is
/// retried for up to 10 s while the lock is held, and fails on anything else.
pub fn open_stopped_store(store: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new().path(store).flush_every_ms(None).open() {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("open the stopped store: {e:?}"),
        }
    }
}

/// Which of `needles` occur in `hay` (their indices, ascending), in one
/// pass over `hay`: for scans of whole stores or a process's memory.
pub fn find_any(hay: &[u8], needles: &[Vec<u8>]) -> Vec<usize> {
    let ac = aho_corasick::AhoCorasick::new(needles).expect("needles");
    let mut found: Vec<usize> = ac.find_overlapping_iter(hay).map(|m| m.pattern().as_usize()).collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Copies a folder tree (a stopped daemon's store, say).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// One frame of an audit segment file (docs/AUDIT.md §4): `kind (b'r'
/// record, b's' seal) || u64be(seq) || u32be(len) || value || SHA-256(all
/// before)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditFrame {
    /// `b'r'` or `b's'`.
    pub kind: u8,
    /// The sequence number in its header.
    pub seq: u64,
    /// The JSON of the record or seal.
    pub value: Vec<u8>,
}

impl AuditFrame {
    /// The frame's bytes, with its checksum computed (what an attacker who
    /// knows the format writes).
    pub fn encode(&self) -> Vec<u8> {
        use sha2::Digest;
        let mut out = vec![self.kind];
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&(self.value.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.value);
        let sum = sha2::Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }
}

/// The audit segment files of a store folder, oldest first.
pub fn audit_segments(store: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(store.join("audit"))
        .expect("the audit folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
}

/// The frames of one segment file with their offsets, up to the end of
/// its data (the zeros the daemon preallocates after it are not frames).
/// Panics on a frame that is not intact.
pub fn read_audit_frames(file: &Path) -> Vec<(usize, AuditFrame)> {
    let bytes = std::fs::read(file).expect("read the segment");
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() && bytes[at] != 0 {
        let seq = u64::from_be_bytes(bytes[at + 1..at + 9].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[at + 9..at + 13].try_into().unwrap()) as usize;
        let f = AuditFrame { kind: bytes[at], seq, value: bytes[at + 13..at + 13 + len].to_vec() };
        let size = 13 + len + 32;
        assert_eq!(
            f.encode(),
            bytes[at..at + size],
            "{}: the frame at offset {at} is not intact",
            file.display()
        );
        out.push((at, f));
        at += size;
    }
    out
}

/// Every frame of a store's audit log, in order.
pub fn audit_frames(store: &Path) -> Vec<AuditFrame> {
    audit_segments(store).iter().flat_map(|f| read_audit_frames(f)).map(|(_, f)| f).collect()
}

/// Replaces a store's audit log by one segment holding `frames` (each with
/// a correct checksum).
pub fn write_audit_frames(store: &Path, frames: &[AuditFrame]) {
    for f in audit_segments(store) {
        std::fs::remove_file(f).unwrap();
    }
    let first = frames.first().map_or(1, |f| f.seq);
    let bytes: Vec<u8> = frames.iter().flat_map(AuditFrame::encode).collect();
    std::fs::write(store.join("audit").join(format!("{first:020}.log")), bytes).unwrap();
}

/// The PostgreSQL server binaries (`initdb`, `pg_ctl`, `psql`):
/// `$KEYHAVEN_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin` (Debian's
/// `postgresql` package). `Err` names what is missing.
pub fn postgres_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KEYHAVEN_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        "PostgreSQL's server binaries (initdb) are not in /usr/lib/postgresql/*/bin: \
         `apt-get install postgresql` (softhsm/install.sh does), or set KEYHAVEN_PG_BIN"
            .to_owned()
    })
}

/// A throwaway PostgreSQL cluster for one test: `initdb` in a temporary
/// folder, a Unix socket in that folder and no TCP listener (but for
/// [`TestPostgres::start_listening_on`]), run as `nobody` when the tests
/// run as root (PostgreSQL refuses root); stopped
/// (and its folder removed) on drop.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<&'static str>,
    /// The server's port (its Unix socket is `.s.PGSQL.PORT` in `dir`).
    port: u16,
    /// The address it also listens on over TCP, if any.
    tcp: Option<String>,
}

impl TestPostgres {
    /// Starts a cluster; `None` (after saying what is missing) when
    /// PostgreSQL is not installed, outside CI. In CI (`CI` set) a missing
    /// PostgreSQL fails the test.
    pub fn start() -> Option<TestPostgres> {
        TestPostgres::start_with(None)
    }

    /// As [`TestPostgres::start`], and listening over TCP on `addr` (an
    /// IPv4 address of this machine, such as a [`TestNetns`]'s host side)
    /// on a free port, trusting connections from `addr`'s /24 (the test
    /// network's). [`TestPostgres::tcp_url`] is how to reach it that way.
    pub fn start_listening_on(addr: &str) -> Option<TestPostgres> {
        TestPostgres::start_with(Some(addr))
    }

    fn start_with(tcp: Option<&str>) -> Option<TestPostgres> {
        let bin = match postgres_bin_dir() {
            Ok(b) => b,
            Err(why) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: this test needs PostgreSQL: {why}");
                return None;
            }
            Err(why) => panic!("{why}"),
        };
        let dir = tempfile::Builder::new().prefix("keyhaven-pg-").tempdir().expect("temp dir");
        let user = (my_uid() == 0).then_some("nobody");
        if user.is_some() {
            // The server runs as `nobody`; root (the tests) reaches the socket anyway.
            let ok = Command::new("chown").arg("nobody").arg(dir.path()).status().expect("chown").success();
            assert!(ok, "chown nobody {}", dir.path().display());
            std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        // A free port on that address (5432 may be taken by a server
        // listening on every address); the default without TCP.
        let port = match tcp {
            Some(addr) => std::net::TcpListener::bind((addr, 0))
                .and_then(|l| l.local_addr())
                .unwrap_or_else(|e| panic!("no free port on {addr}: {e}"))
                .port(),
            None => 5432,
        };
        let pg = TestPostgres { dir, bin, user, port, tcp: tcp.map(str::to_owned) };
        let data = pg.dir.path().join("data");
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "keyhaven", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        if let Some(addr) = tcp {
            let net = addr.rsplit_once('.').map(|(n, _)| n).expect("an IPv4 address");
            let hba = data.join("pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
            text.push_str(&format!("host all keyhaven {net}.0/24 trust\n"));
            std::fs::write(&hba, text).expect("write pg_hba.conf");
        }
        let options = format!(
            "-k {} -p {} -c listen_addresses='{}' -c shared_buffers=16MB -c max_connections=40",
            pg.dir.path().display(),
            pg.port,
            tcp.unwrap_or("")
        );
        let out = pg
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.path().join("server.log"))
            .args(["-o", &options])
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "PostgreSQL did not start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(pg.dir.path().join("server.log")).unwrap_or_default()
        );
        Some(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// The connection string of database `db` (over the Unix socket).
    pub fn url(&self, db: &str) -> String {
        let port = if self.port == 5432 { String::new() } else { format!(" port={}", self.port) };
        format!("host={}{port} user=keyhaven dbname={db}", self.dir.path().display())
    }

    /// The connection string of database `db` over TCP, for a server
    /// started by [`TestPostgres::start_listening_on`].
    pub fn tcp_url(&self, db: &str) -> String {
        let addr = self.tcp.as_deref().expect("a server listening over TCP");
        format!("host={addr} port={} user=keyhaven dbname={db}", self.port)
    }

    /// Runs `sql` in database `db` with `psql`; returns its output
    /// (unaligned, tuples only); panics on an error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "keyhaven", "-d", db, "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql `{sql}`: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates an empty database.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// Stops the server (fast: open connections are cut), until
    /// [`TestPostgres::restart`] starts it again.
    pub fn stop(&self) {
        let data = self.dir.path().join("data");
        let out =
            self.command("pg_ctl").args(["stop", "-w", "-m", "fast", "-D"]).arg(&data).output().unwrap();
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The server's processes: the postmaster (first) and its children
    /// (the backends and helpers), for signals (SIGSTOP: a server that
    /// stops answering without closing anything).
    pub fn server_pids(&self) -> Vec<u32> {
        let pidfile = std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .expect("postmaster.pid");
        let postmaster: u32 = pidfile.lines().next().and_then(|l| l.trim().parse().ok()).expect("a pid");
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // `pid (comm) state ppid …`; comm may hold spaces or parentheses.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
            if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Stops the server (fast: open connections are cut) and starts it
    /// again, as a restart under load would; or starts it after
    /// [`TestPostgres::stop`].
    pub fn restart(&self) {
        let data = self.dir.path().join("data");
        let out = self
            .command("pg_ctl")
            .args(["restart", "-w", "-m", "fast", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl restart: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self.command("pg_ctl").args(["stop", "-w", "-m", "immediate", "-D"]).arg(&data).output();
    }
}

/// Every audit record the daemon holds, read page by page with `audit_read`.
pub async fn audit_records(c: &Client) -> Vec<keyhaven::wire::AuditRecord> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page =
            c.call(&keyhaven::wire::AuditRead { after: Some(after), ..Default::default() }).await.unwrap();
        out.extend(page.records);
        if !page.more {
            return out;
        }
        after = page.next;
    }
}

/// iproute2's `ip`: the first of the usual places that has it, else `ip`
/// on the `PATH`.
pub fn ip_tool() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ip"))
}

/// A network namespace of its own joined to this one by a veth pair, for
/// cutting a process off the network while it keeps running: a process
/// started in it (`ip netns exec`, [`TestDaemon::run_in_netns`]) reaches
/// this namespace's `host_addr` (a server listening there, such as
/// [`TestPostgres::start_listening_on`]) through the pair, and
/// [`TestNetns::cut`] takes the host side's link down, so that every packet
/// between them vanishes (nothing answers, nothing is refused: the
/// namespace's side keeps its route and a permanent neighbour entry for
/// `host_addr`, so its connections and connection attempts just time out,
/// as across a dead link). Names and a 10.x.y.0/24 network unique to this
/// one; the pair and the namespace are deleted on drop, panic or not.
pub struct TestNetns {
    name: String,
    host_dev: String,
    host_addr: String,
    ns_addr: String,
}

impl TestNetns {
    /// Makes the namespace and its link; `None` (after saying why) when
    /// not root or when network namespaces or veth pairs are not available
    /// here, outside CI. In CI (`CI` set) that fails the test.
    pub fn create() -> Option<TestNetns> {
        let skip = |why: String| {
            if std::env::var_os("CI").is_some() {
                panic!("this test needs a network namespace: {why}");
            }
            eprintln!("SKIPPED: this test needs a network namespace: {why}");
            None
        };
        if my_uid() != 0 {
            return skip("it must run as root (it makes a namespace and a veth pair)".into());
        }
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are at most 15 bytes: "kh" + pid in hex (at most
        // 6) + n + 1.
        let id = format!("{pid:x}{n}");
        let used = format!(
            "{}{}",
            ip(&["-4", "-o", "addr", "show"]).unwrap_or_default(),
            ip(&["-4", "route", "show", "table", "all"]).unwrap_or_default()
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        let net = (0..64u64)
            .map(|attempt| {
                let seed = (pid as u64) * 7919 + (n as u64) * 104_729 + attempt * 7_777 + nanos;
                format!("10.{}.{}", 200 + seed % 54, (seed / 54) % 256)
            })
            .find(|net| !used.contains(&format!("{net}.")))
            .expect("a free 10.x.y.0/24 network");
        let ns = TestNetns {
            name: format!("khtest-{id}"),
            host_dev: format!("kh{id}h"),
            host_addr: format!("{net}.1"),
            ns_addr: format!("{net}.2"),
        };
        let ns_dev = format!("kh{id}n");
        if let Err(why) = ip(&["netns", "add", &ns.name]) {
            return skip(why);
        }
        let host_mac = |ns: &TestNetns| {
            std::fs::read_to_string(format!("/sys/class/net/{}/address", ns.host_dev))
                .map(|m| m.trim().to_owned())
                .map_err(|e| format!("the MAC address of {}: {e}", ns.host_dev))
        };
        let made =
            ip(&["link", "add", &ns.host_dev, "type", "veth", "peer", "name", &ns_dev, "netns", &ns.name])
                .and_then(|_| ip(&["addr", "add", &format!("{}/24", ns.host_addr), "dev", &ns.host_dev]))
                .and_then(|_| ip(&["link", "set", &ns.host_dev, "up"]))
                .and_then(|_| {
                    ip(&["-n", &ns.name, "addr", "add", &format!("{}/24", ns.ns_addr), "dev", &ns_dev])
                })
                .and_then(|_| ip(&["-n", &ns.name, "link", "set", &ns_dev, "up"]))
                .and_then(|_| ip(&["-n", &ns.name, "link", "set", "lo", "up"]))
                .and_then(|_| host_mac(&ns))
                .and_then(|mac| {
                    let host = &ns.host_addr;
                    ip(&[
                        "-n",
                        &ns.name,
                        "neigh",
                        "replace",
                        host,
                        "lladdr",
                        &mac,
                        "dev",
                        &ns_dev,
                        "nud",
                        "permanent",
                    ])
                });
        match made {
            Ok(_) => Some(ns),
            Err(why) => skip(why), // `ns` is dropped: what was made is deleted
        }
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's address on the link (where a server listens for
    /// the process in the namespace).
    pub fn host_addr(&self) -> &str {
        &self.host_addr
    }

    /// The namespace's address on the link.
    pub fn ns_addr(&self) -> &str {
        &self.ns_addr
    }

    /// Cuts the link: the host side goes down, and every packet either
    /// way vanishes.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_dev, "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Brings the link back.
    pub fn restore(&self) {
        ip(&["link", "set", &self.host_dev, "up"]).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_dev]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `ip ARGS`; `Err` names the command and what it said.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new(ip_tool())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ip_tool().display()))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A dev install's SoftHSM2 token folder (one per token under `tokens/`).
pub fn token_dir(dir: &Path) -> PathBuf {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir.join("tokens")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.remove(0)
}

/// The value of the unlabelled series `name` in a metrics exposition.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample `{name}` in:\n{text}"))
}
