//! The token and the store, checked from outside the daemon: pkcs11-tool
//! reads the master key's attributes, a store copied next to another token
//! decrypts nothing, the store holds no plaintext key material, the
//! production set-up path (`init`, then `run`) works on a token made by
//! softhsm2-util, and start-up refuses bad set-ups with clear messages.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use keyhaven_tests::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A process this test started; killed on drop if still running.
struct Proc {
    what: String,
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// What a finished process left behind.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn collect<R: Read + Send + 'static>(r: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Some(collect(child.stdout.take().expect("stdout")));
        let stderr = Some(collect(child.stderr.take().expect("stderr")));
        Proc { what, child: Some(child), stdout, stderr }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("process running")
    }

    fn take_output(&mut self, status: ExitStatus) -> Finished {
        self.child = None;
        let stdout = self.stdout.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Finished { status, stdout, stderr }
    }

    /// Waits for the exit (killing the process after `limit`).
    fn finish(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child().try_wait().expect("wait") {
                return self.take_output(status);
            }
            if Instant::now() > deadline {
                let _ = self.child().kill();
                let status = self.child().wait().expect("wait");
                let out = self.take_output(status);
                panic!("{} did not exit within {limit:?}; stderr:\n{}", self.what, out.stderr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `socket` accepts connections; panics (with the log) if
    /// the process exits first.
    fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child().try_wait().expect("wait") {
                let out = self.take_output(status);
                panic!("{} exited with {status} before listening:\n{}", self.what, out.stderr);
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {} within 30 s",
                self.what,
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(mut self) -> Finished {
        signal(self.child().id(), "TERM");
        self.finish(Duration::from_secs(30))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `keyhavend ARGS`, with none of the user's SoftHSM2 settings.
fn keyhavend(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("keyhavend"));
    cmd.args(args)
        .env_remove("SOFTHSM2_CONF")
        .env_remove("KEYHAVEN_SOFTHSM_MODULE")
        .env("KEYHAVEN_LOG", "info");
    cmd
}

/// Runs a `keyhavend` command that is expected to exit by itself.
fn keyhavend_once(args: &[&str]) -> Finished {
    Proc::spawn(&mut keyhavend(args)).finish(Duration::from_secs(30))
}

fn config_arg(config: &Path) -> String {
    config.to_str().expect("utf-8 path").to_owned()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap();
}

fn read_pin(file: &Path) -> String {
    std::fs::read_to_string(file).unwrap().trim_end().to_owned()
}

/// A secret key object as `pkcs11-tool --list-objects` prints it:
///
/// ```text
/// Secret Key Object; AES length 32
///   label:      keyhaven-mk-v1
///   Usage:      wrap, unwrap
///   Access:     sensitive, always sensitive, never extractable, local
/// ```
#[derive(Debug, Default)]
struct ListedObject {
    header: String,
    label: String,
    usage: Vec<String>,
    access: Vec<String>,
}

fn items(value: &str) -> Vec<String> {
    value.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

/// Lists the secret key objects of a token with OpenSC's pkcs11-tool,
/// logged in as the user, under the given SOFTHSM2_CONF.
fn list_secret_keys(softhsm_conf: &Path, token_label: &str, pin: &str) -> (Vec<ListedObject>, String) {
    let out = Proc::spawn(
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(softhsm_module())
            .args([
                "--token-label",
                token_label,
                "--login",
                "--pin",
                pin,
                "--list-objects",
                "--type",
                "secrkey",
            ])
            .env("SOFTHSM2_CONF", softhsm_conf),
    )
    .finish(Duration::from_secs(30));
    assert!(out.status.success(), "pkcs11-tool failed ({}):\n{}\n{}", out.status, out.stdout, out.stderr);
    let mut objects: Vec<ListedObject> = Vec::new();
    for line in out.stdout.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            objects.push(ListedObject { header: line.trim().to_owned(), ..Default::default() });
            continue;
        }
        let Some(obj) = objects.last_mut() else { continue };
        let Some((name, value)) = line.trim().split_once(':') else { continue };
        match name.trim() {
            "label" => obj.label = value.trim().to_owned(),
            "Usage" => obj.usage = items(value),
            "Access" => obj.access = items(value),
            _ => {}
        }
    }
    (objects, out.stdout)
}

/// Asserts that the token holds exactly two secret keys: the master key
/// version 1 (AES-256, wrap and unwrap only) and the audit key (a 256-bit
/// generic secret for HMAC), both sensitive and never extractable.
fn assert_only_the_master_key(softhsm_conf: &Path, token_label: &str, pin: &str) {
    let (objects, raw) = list_secret_keys(softhsm_conf, token_label, pin);
    let secret: Vec<&ListedObject> =
        objects.iter().filter(|o| o.header.starts_with("Secret Key Object")).collect();
    assert_eq!(
        secret.len(),
        2,
        "exactly two secret key objects (the master key and the audit key) must be on the token:\n{raw}"
    );
    for key in &secret {
        for needed in ["sensitive", "always sensitive", "never extractable"] {
            assert!(key.access.iter().any(|a| a == needed), "{}: Access lacks `{needed}`:\n{raw}", key.label);
        }
        assert!(
            !key.access.iter().any(|a| a == "extractable"),
            "{} is shown as extractable:\n{raw}",
            key.label
        );
    }
    let mk = secret
        .iter()
        .find(|o| o.label == "keyhaven-mk-v1")
        .unwrap_or_else(|| panic!("no master key:\n{raw}"));
    assert!(mk.header.starts_with("Secret Key Object; AES length 32"), "not an AES-256 key:\n{raw}");
    assert!(mk.usage.iter().any(|u| u == "wrap") && mk.usage.iter().any(|u| u == "unwrap"), "{raw}");
    assert!(
        !mk.usage.iter().any(|u| u == "encrypt" || u == "decrypt"),
        "the master key is for wrapping only:\n{raw}"
    );
    let ak =
        secret.iter().find(|o| o.label == "keyhaven-audit").unwrap_or_else(|| panic!("no audit key:\n{raw}"));
    assert!(ak.header.starts_with("Secret Key Object; Generic secret length 32"), "audit key type:\n{raw}");
    assert!(
        !ak.usage.iter().any(|u| ["encrypt", "decrypt", "wrap", "unwrap"].contains(&u.as_str())),
        "the audit key is for HMAC only:\n{raw}"
    );
}

/// Writes a SoftHSM2 configuration whose tokens live in `dir/tokens`.
fn softhsm_conf_in(dir: &Path) -> PathBuf {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o700)).unwrap();
    let conf = dir.join("softhsm2.conf");
    write_private(
        &conf,
        &format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    );
    conf
}

/// Creates a token with softhsm2-util, as an operator would.
fn init_token_with_softhsm_util(conf: &Path, label: &str, pin: &str, so_pin: &str) {
    let out = Proc::spawn(
        Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin])
            .env("SOFTHSM2_CONF", conf),
    )
    .finish(Duration::from_secs(30));
    assert!(out.status.success(), "softhsm2-util failed:\n{}\n{}", out.stdout, out.stderr);
}

/// A config file's text. `hsm_extra` lines go into `[hsm]`.
fn config_text(mode: &str, socket: &Path, store: &Path, token_label: &str, hsm_extra: &str) -> String {
    format!(
        "mode = \"{mode}\"\nsocket = \"{}\"\nstore = \"{}\"\n\n[hsm]\nmodule = \"{}\"\ntoken_label = \"{token_label}\"\n{hsm_extra}",
        socket.display(),
        store.display(),
        softhsm_module().display(),
    )
}

// ---------------------------------------------------------------------------
// 1. pkcs11-tool reads the master key's attributes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_tool_shows_one_sensitive_never_extractable_master_key() {
    let mut d = TestDaemon::start();
    let conf = d.dir().join("softhsm2.conf");
    let pin = read_pin(&d.dir().join("pin"));
    {
        let c = d.client().await;
        for p in ["acme/pii", "acme/smtp", "beta/pii"] {
            c.key_create(&path(p)).await.unwrap();
        }
        let none = ctx(&[]);
        for p in ["acme/pii", "acme/smtp", "beta/pii"] {
            for _ in 0..3 {
                let dk = c.datakey(&path(p), &none, keyhaven::Plaintext::Include).await.unwrap();
                c.datakey_decrypt(&dk.envelope, &none).await.unwrap();
            }
            let enc = c.encrypt(&path(p), b"x", &none).await.unwrap();
            c.decrypt(&enc.ciphertext, &none).await.unwrap();
        }
    }
    // While the daemon runs (its KEKs are loaded as session objects, which
    // another application never sees, and never as token objects)…
    assert_only_the_master_key(&conf, "keyhaven-dev", &pin);
    // …and after it stopped.
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
    assert_only_the_master_key(&conf, "keyhaven-dev", &pin);
}

// ---------------------------------------------------------------------------
// 2. A copied store against another token decrypts nothing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_store_copied_next_to_another_token_decrypts_nothing() {
    let context = ctx(&["user=42"]);
    let mut a = TestDaemon::start();
    let (enc, dk) = {
        let c = a.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        let enc = c.encrypt(&path("acme/pii"), b"copied-store-secret", &context).await.unwrap();
        let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
        // Control: they decrypt where they were made.
        assert_eq!(
            c.decrypt(&enc.ciphertext, &context).await.unwrap().plaintext.expose(),
            b"copied-store-secret"
        );
        assert_eq!(Some(c.datakey_decrypt(&dk.envelope, &context).await.unwrap().plaintext), dk.plaintext);
        (enc, dk)
    };
    let (status, log) = a.stop();
    assert!(status.success(), "{status}\n{log}");

    // B: another dev install, with its own token and its own master key v1.
    let mut b = TestDaemon::start();
    // One request first: a SIGTERM right after start-up is mishandled (see
    // `sigterm_right_after_start_up_exits_cleanly`), and that is not what
    // this test is about.
    assert_eq!(b.client().await.health().await.unwrap().status, "ok");
    let (status, log) = b.stop();
    assert!(status.success(), "{status}\n{log}");
    std::fs::remove_dir_all(b.store_dir()).unwrap();
    copy_dir(&a.store_dir(), &b.store_dir());

    // B's token anchors B's own store: A's copy does not match it.
    let out = b.run_once();
    assert!(!out.status.success(), "a store started next to another token's anchor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match the token's anchor"), "{err}");
    // B's operator (who has B's PIN) accepts the copy: B's master key v1 is
    // not the one A's store pinned, and B still refuses to start.
    b.accept_store("test: a store from another install");
    let out = b.run_once();
    assert!(!out.status.success(), "a store started next to another token's master key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keyhaven-mk-v1") && err.contains("not the one the store recorded"), "{err}");
    // With the pins stripped as well (and accepted once more), B pins its
    // own key and starts, but still decrypts nothing.
    {
        let db = open_stopped_store(&b.store_dir());
        let meta = db.open_tree("meta").unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&meta.get("meta").unwrap().unwrap()).unwrap();
        m.as_object_mut().unwrap().remove("master_keys");
        meta.insert("meta", serde_json::to_vec(&m).unwrap()).unwrap();
        db.flush().unwrap();
    }
    b.accept_store("test: pins stripped");
    let config = b.dir().join("keyhaven.toml");
    let mut daemon = Proc::spawn(&mut keyhavend(&["run", "--config", &config_arg(&config)]));
    daemon.wait_for_socket(b.socket());
    {
        let c = b.client().await;
        let keys = c.key_list(None).await.unwrap();
        let names: Vec<String> = keys.iter().map(|k| format!("{}/{}", k.tenant, k.key)).collect();
        assert_eq!(names, ["acme/pii"], "the copied store's key is listed");

        let e = c.decrypt(&enc.ciphertext, &context).await.expect_err("decrypt must fail on another token");
        assert_eq!(e.code(), Some(ErrorCode::Integrity), "decrypt: {e}");
        let e = c.datakey_decrypt(&dk.envelope, &context).await.expect_err("datakey_decrypt must fail");
        assert_eq!(e.code(), Some(ErrorCode::Integrity), "datakey_decrypt: {e}");
        // Nor does a new data key under the copied key come out of B: its
        // KEK is wrapped under A's master key.
        let e = c.encrypt(&path("acme/pii"), b"y", &ctx(&[])).await.expect_err("encrypt must fail");
        assert_eq!(e.code(), Some(ErrorCode::Integrity), "encrypt under the copied key: {e}");

        // B itself works: a key made on B round-trips.
        c.key_create(&path("beta/pii")).await.unwrap();
        let own = c.encrypt(&path("beta/pii"), b"b's own", &context).await.unwrap();
        assert_eq!(c.decrypt(&own.ciphertext, &context).await.unwrap().plaintext.expose(), b"b's own");
    }
    let out = daemon.terminate();
    assert!(out.status.success(), "{}\n{}", out.status, out.stderr);
    assert!(!out.stderr.contains("copied-store-secret"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------
// 3. No plaintext key material, plaintext or PIN in the store
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn the_store_holds_no_plaintext_data_key_plaintext_or_pin() {
    const MARKER: &[u8; 40] = b"KEYHAVEN-MARKER-plaintext-0123456789-XyZ";
    let mut d = TestDaemon::start();
    let mut data_keys: Vec<Vec<u8>> = Vec::new();
    {
        let c = d.client().await;
        let keys = ["acme/pii", "acme/smtp", "beta/pii"];
        for p in keys {
            c.key_create(&path(p)).await.unwrap();
        }
        for i in 0..60 {
            let p = path(keys[i % keys.len()]);
            let context = if i % 2 == 0 { ctx(&[]) } else { ctx(&[&format!("row={i}")]) };
            let dk = c.datakey(&p, &context, keyhaven::Plaintext::Include).await.unwrap();
            let key = dk.plaintext.expect("plaintext asked for");
            assert_eq!(key.len(), 32);
            data_keys.push(key.expose().to_vec());
            let enc = c.encrypt(&p, MARKER, &context).await.unwrap();
            assert_eq!(c.decrypt(&enc.ciphertext, &context).await.unwrap().plaintext.expose(), MARKER);
        }
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");

    let files = read_all_files(&d.store_dir());
    assert!(!files.is_empty(), "the store has files");
    // The scan is meaningful: the store is not compressed or encrypted as a
    // whole, so names written to it are found.
    assert!(files.iter().any(|(_, b)| contains(b, b"smtp")), "key names are expected in the store");

    let forms = |bytes: &[u8]| -> Vec<(String, Vec<u8>)> {
        vec![
            ("raw".into(), bytes.to_vec()),
            ("base64".into(), STANDARD.encode(bytes).into_bytes()),
            ("base64url".into(), URL_SAFE.encode(bytes).into_bytes()),
            ("base64url-nopad".into(), URL_SAFE_NO_PAD.encode(bytes).into_bytes()),
            ("hex".into(), bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes()),
        ]
    };
    let mut needles: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, key) in data_keys.iter().enumerate() {
        needles.extend(forms(key).into_iter().map(|(f, n)| (format!("data key #{i} ({f})"), n)));
    }
    needles.extend(forms(MARKER).into_iter().map(|(f, n)| (format!("marker plaintext ({f})"), n)));
    let pin = read_pin(&d.dir().join("pin"));
    let so_pin = read_pin(&d.dir().join("so-pin"));
    assert!(pin.len() >= 16 && so_pin.len() >= 16);
    needles.push(("user PIN".into(), pin.into_bytes()));
    needles.push(("SO PIN".into(), so_pin.into_bytes()));
    let patterns: Vec<Vec<u8>> = needles.iter().map(|(_, n)| n.clone()).collect();
    for (file, bytes) in &files {
        if let Some(i) = find_any(bytes, &patterns).first() {
            panic!("{} found in {}", needles[*i].0, file.display());
        }
    }
}

// ---------------------------------------------------------------------------
// 4. The production path: softhsm2-util, init, run
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn production_path_init_then_run_on_an_operator_made_token() {
    let dir = tempfile::Builder::new().prefix("keyhaven-prod-").tempdir().unwrap();
    // Production mode refuses a socket directory others may read.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let conf = softhsm_conf_in(dir.path());
    let pin = random_hex(16);
    let so_pin = random_hex(16);
    init_token_with_softhsm_util(&conf, "prodtest", &pin, &so_pin);
    let pin_file = dir.path().join("pin");
    write_private(&pin_file, &format!("{pin}\n"));
    assert_eq!(std::fs::metadata(&pin_file).unwrap().permissions().mode() & 0o777, 0o600);
    let socket = dir.path().join("keyhaven.sock");
    let store = dir.path().join("store");
    let config = dir.path().join("keyhaven.toml");
    write_private(
        &config,
        &config_text(
            "production",
            &socket,
            &store,
            "prodtest",
            &format!(
                "pin_file = \"{}\"\nsofthsm2_conf = \"{}\"\nallow_softhsm = true\n\n[[policy.rules]]\nprincipals = [\"uid:{}\"]\n\
                 operations = [\"key-admin\", \"encrypt\", \"decrypt\"]\nkeys = [\"acme/*\"]\n",
                pin_file.display(),
                conf.display(),
                my_uid()
            ),
        ),
    );
    let config = config_arg(&config);

    let first = keyhavend_once(&["init", "--config", &config]);
    assert!(first.status.success(), "init failed ({}):\n{}{}", first.status, first.stdout, first.stderr);
    let said = format!("{}{}", first.stdout, first.stderr);
    assert!(said.contains("keyhaven-mk-v1"), "init must name the master key: {said}");
    assert!(said.contains("prodtest"), "init must name the token: {said}");
    assert_only_the_master_key(&conf, "prodtest", &pin);

    let second = keyhavend_once(&["init", "--config", &config]);
    assert!(!second.status.success(), "a second init must fail:\n{}", second.stdout);
    assert!(second.stderr.contains("initialised already"), "{}", second.stderr);
    assert!(second.stderr.contains("nothing"), "the message must say nothing changed: {}", second.stderr);
    assert!(second.stderr.contains(&store.display().to_string()), "names the store: {}", second.stderr);
    // Nothing changed in the token.
    assert_only_the_master_key(&conf, "prodtest", &pin);

    let mut daemon = Proc::spawn(&mut keyhavend(&["--config", &config]));
    daemon.wait_for_socket(&socket);
    {
        let c = Client::connect(&socket).await.expect("connect");
        let h = c.health().await.unwrap();
        assert_eq!(h.status, "ok");
        assert_eq!(h.token.label, "prodtest");
        c.key_create(&path("acme/pii")).await.unwrap();
        let context = ctx(&["user=1"]);
        let enc = c.encrypt(&path("acme/pii"), b"production secret", &context).await.unwrap();
        assert!(enc.ciphertext.starts_with("khc1:"));
        assert_eq!(
            c.decrypt(&enc.ciphertext, &context).await.unwrap().plaintext.expose(),
            b"production secret"
        );
    }
    let out = daemon.terminate();
    assert_eq!(out.status.code(), Some(0), "SIGTERM must exit 0; stderr:\n{}", out.stderr);
    assert!(!socket.exists(), "the socket file must be removed at exit");
    assert!(!out.stderr.contains(&pin), "the PIN must never be logged");
    assert_only_the_master_key(&conf, "prodtest", &pin);
}

// ---------------------------------------------------------------------------
// 5. Start-up refusals
// ---------------------------------------------------------------------------

/// Runs `keyhavend run --config FILE` with `text` as FILE (inside `dir`)
/// and expects a refusal; returns stderr.
fn refused(dir: &Path, name: &str, text: &str) -> (PathBuf, String) {
    let file = dir.join(name);
    write_private(&file, text);
    let out = keyhavend_once(&["run", "--config", &config_arg(&file)]);
    assert!(!out.status.success(), "{name}: keyhavend must refuse to start; stderr:\n{}", out.stderr);
    // 69 (EX_UNAVAILABLE) for a token that is not there (yet), which the
    // unit retries; 78 (EX_CONFIG) for everything an operator must fix.
    let expected = if name == "no-token.toml" { 69 } else { 78 };
    assert_eq!(out.status.code(), Some(expected), "{name}: must exit {expected}: {}", out.stderr);
    assert!(!out.stderr.is_empty(), "{name}: no message");
    (file, out.stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_refuses_bad_set_ups_with_clear_messages() {
    // A dev install provides an initialised store and a token. (One request
    // before the stop: see `sigterm_right_after_start_up_exits_cleanly`.)
    let mut d = TestDaemon::start();
    assert_eq!(d.client().await.health().await.unwrap().status, "ok");
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
    let dir = d.dir().to_owned();
    let conf = dir.join("softhsm2.conf");
    let store = dir.join("store");
    let socket = dir.join("other.sock");
    let good_pin = dir.join("pin");
    let hsm = |pin_line: &str| format!("{pin_line}softhsm2_conf = \"{}\"\n", conf.display());
    let with_pin_file = |f: &Path| hsm(&format!("pin_file = \"{}\"\n", f.display()));

    // Wrong PIN (tried once only: SoftHSM counts failures).
    let wrong_pin = dir.join("wrong-pin");
    write_private(&wrong_pin, &format!("{}\n", random_hex(16)));
    let (_, err) = refused(
        &dir,
        "wrong-pin.toml",
        &config_text("dev", &socket, &store, "keyhaven-dev", &with_pin_file(&wrong_pin)),
    );
    assert!(err.contains("PIN is incorrect"), "{err}");
    assert!(err.contains("keyhaven-dev"), "names the token: {err}");
    assert!(!err.contains(&read_pin(&wrong_pin)), "the PIN must not be printed: {err}");
    assert!(!socket.exists());

    // A token label that does not exist.
    let (_, err) = refused(
        &dir,
        "no-token.toml",
        &config_text("dev", &socket, &store, "no-such-token", &with_pin_file(&good_pin)),
    );
    assert!(err.contains("no-such-token"), "names the label: {err}");
    assert!(err.contains("no token labelled"), "{err}");

    // A store that was never initialised.
    let empty = dir.join("never-initialised");
    let (_, err) = refused(
        &dir,
        "uninitialised.toml",
        &config_text("dev", &socket, &empty, "keyhaven-dev", &with_pin_file(&good_pin)),
    );
    assert!(err.contains("keyhavend init"), "{err}");
    assert!(err.contains("not initialised"), "{err}");
    assert!(err.contains(&empty.display().to_string()), "names the store: {err}");

    // An unknown field.
    let text = config_text("dev", &socket, &store, "keyhaven-dev", &with_pin_file(&good_pin))
        + "colour = \"blue\"\n";
    let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
    let (file, err) = refused(&dir, "unknown-field.toml", &text);
    assert!(err.contains(&file.display().to_string()), "names the file: {err}");
    assert!(err.contains("colour"), "names the field: {err}");
    assert!(err.contains(&format!("line {line}")), "names line {line}: {err}");

    // A syntax error.
    let text = format!("mode = \"dev\"\nsocket = \"{}\nstore = \"{}\"\n", socket.display(), store.display());
    let (file, err) = refused(&dir, "syntax.toml", &text);
    assert!(err.contains(&file.display().to_string()), "names the file: {err}");
    assert!(err.contains("line 2"), "names the line: {err}");

    // Both pin_file and pin_env.
    let (file, err) = refused(
        &dir,
        "both-pins.toml",
        &config_text(
            "dev",
            &socket,
            &store,
            "keyhaven-dev",
            &hsm(&format!("pin_file = \"{}\"\npin_env = \"KEYHAVEN_PIN\"\n", good_pin.display())),
        ),
    );
    assert!(err.contains(&file.display().to_string()), "names the file: {err}");
    assert!(err.contains("pin_file") && err.contains("pin_env"), "{err}");
    assert!(err.contains("not both"), "{err}");

    // Neither.
    let (_, err) =
        refused(&dir, "no-pin.toml", &config_text("dev", &socket, &store, "keyhaven-dev", &hsm("")));
    assert!(err.contains("pin_file") && err.contains("pin_env"), "{err}");

    // A missing config file.
    let missing = dir.join("missing.toml");
    let out = keyhavend_once(&["run", "--config", &config_arg(&missing)]);
    assert!(!out.status.success());
    assert!(out.stderr.contains(&missing.display().to_string()), "{}", out.stderr);

    assert!(!socket.exists(), "no refusal may leave a socket behind");

    // The one wrong PIN neither locked the token nor harmed the install.
    let config = dir.join("keyhaven.toml");
    let mut daemon = Proc::spawn(&mut keyhavend(&["run", "--config", &config_arg(&config)]));
    daemon.wait_for_socket(d.socket());
    {
        let c = d.client().await;
        assert_eq!(c.health().await.unwrap().status, "ok");
    }
    let out = daemon.terminate();
    assert!(out.status.success(), "{}", out.stderr);
}

// ---------------------------------------------------------------------------
// 6. `keyhavend dev` again on the same folder reuses the install
// ---------------------------------------------------------------------------

fn token_files(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = read_all_files(&dir.join("tokens"))
        .into_iter()
        .map(|(p, _)| p.strip_prefix(dir).unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_again_on_the_same_folder_reuses_the_install() {
    let mut d = TestDaemon::start();
    let context = ctx(&["row=9"]);
    let (enc, dk) = {
        let c = d.client().await;
        c.key_create(&path("acme/pii")).await.unwrap();
        let enc = c.encrypt(&path("acme/pii"), b"made in the first run", &context).await.unwrap();
        let dk = c.datakey(&path("acme/pii"), &context, keyhaven::Plaintext::Include).await.unwrap();
        (enc, dk)
    };
    let dir = d.dir().to_owned();
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let before = (read("pin"), read("so-pin"), read("softhsm2.conf"), read("keyhaven.toml"));
    let files_before = token_files(&dir);

    d.restart();

    let after = (read("pin"), read("so-pin"), read("softhsm2.conf"), read("keyhaven.toml"));
    assert!(before == after, "the second `keyhavend dev` must not recreate the PINs or config");
    // The same token: every object file is still there (the daemon may
    // have added one, e.g. the audit log's anchor at its first seal).
    let files_after = token_files(&dir);
    assert!(
        files_before.iter().all(|f| files_after.contains(f)),
        "the second `keyhavend dev` must not recreate the token: {files_before:?} -> {files_after:?}"
    );
    let c = d.client().await;
    let h = c.health().await.unwrap();
    assert_eq!((h.status.as_str(), h.token.label.as_str()), ("ok", "keyhaven-dev"));
    assert_eq!(c.key_list(None).await.unwrap().len(), 1);
    let dec = c.decrypt(&enc.ciphertext, &context).await.unwrap();
    assert_eq!(dec.plaintext.expose(), b"made in the first run");
    assert_eq!(dec.envelope_id, enc.envelope_id);
    let back = c.datakey_decrypt(&dk.envelope, &context).await.unwrap();
    assert_eq!(Some(back.plaintext), dk.plaintext);
    drop(c);
    assert_only_the_master_key(
        &d.dir().join("softhsm2.conf"),
        "keyhaven-dev",
        &read_pin(&d.dir().join("pin")),
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{status}\n{log}");
}

// ---------------------------------------------------------------------------
// 7. SIGTERM as soon as the daemon says it is ready
// ---------------------------------------------------------------------------

/// A supervisor (systemd, a test harness) may stop the daemon the moment it
/// is ready: that must be a clean stop too (exit 0, socket removed), not a
/// death by the signal's default action.
#[test]
fn sigterm_right_after_start_up_exits_cleanly() {
    // The window is small; three fresh installs make a miss very unlikely.
    for _ in 0..3 {
        let mut d = TestDaemon::start();
        let socket = d.socket().to_owned();
        let (status, log) = d.stop();
        assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM right after `export KEYHAVEN_SOCKET=` must exit 0, got {status}:\n{log}"
        );
        assert!(!socket.exists(), "the socket must be removed");
    }
}

// ---------------------------------------------------------------------------
// 8. The audit key of a token from before the audit log
// ---------------------------------------------------------------------------

/// A token made before the audit log has no audit key: the daemon creates
/// it on start (sensitive, never extractable), and seals with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_an_audit_key_gets_one_on_start() {
    let mut d = TestDaemon::start();
    let c = d.client().await;
    c.key_create(&path("acme/first")).await.unwrap(); // record 1, sealed at shutdown with the first audit key
    drop(c);
    let (status, _) = d.stop();
    assert!(status.success());
    let conf = d.dir().join("softhsm2.conf");
    let pin = read_pin(&d.dir().join("pin"));
    let out = Proc::spawn(
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(softhsm_module())
            .args(["--token-label", "keyhaven-dev", "--login", "--pin", &pin])
            .args(["--delete-object", "--type", "secrkey", "--label", "keyhaven-audit"])
            .env("SOFTHSM2_CONF", &conf),
    )
    .finish(Duration::from_secs(30));
    assert!(out.status.success(), "pkcs11-tool failed: {}{}", out.stdout, out.stderr);
    let (objects, raw) = list_secret_keys(&conf, "keyhaven-dev", &pin);
    assert!(!objects.iter().any(|o| o.label == "keyhaven-audit"), "deleted:\n{raw}");

    d.start_again();
    assert_only_the_master_key(&conf, "keyhaven-dev", &pin);
    let c = d.client().await;
    c.key_create(&path("acme/pii")).await.unwrap();
    drop(c);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("created the audit key"), "{log}");
    // The records made since are sealed with the new key. (Seals made with
    // the deleted key no longer verify: that is what a lost key means.)
    d.start_again();
    let v = d.cli(&["audit", "verify"], b"");
    let t = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
    assert!(
        !v.status.success() && t.contains("(bad_seal)"),
        "the first run's seal was made by the old key: {t}"
    );
}
