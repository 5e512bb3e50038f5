//! Production mode (issue 6): every start-up refusal names what to change,
//! the PIN can come from a systemd credential, config errors name the file,
//! line and key, core dumps are off, logs can be JSON, and the PIN never
//! prints. Each test makes its own SoftHSM2 token with softhsm2-util, as an
//! operator would, and runs `keyhavend` in production mode against it.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keyhaven_tests::*;

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A production install on a SoftHSM2 token made by softhsm2-util:
/// `dir/{softhsm2.conf,tokens/,pin,run/,store/,keyhaven.toml}`, initialised.
struct Install {
    dir: tempfile::TempDir,
    pin: String,
}

impl Install {
    fn new() -> Install {
        Install::with_pin(&random_hex(16))
    }

    /// An install whose token's user PIN is `pin`.
    fn with_pin(pin: &str) -> Install {
        let dir = tempfile::Builder::new().prefix("keyhaven-prod-").tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("tokens")).unwrap();
        chmod(&d.join("tokens"), 0o700);
        write_mode(
            &d.join("softhsm2.conf"),
            &format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                d.join("tokens").display()
            ),
            0o600,
        );
        let pin = pin.to_owned();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", "prod", "--pin", &pin, "--so-pin", &random_hex(16)])
            .env("SOFTHSM2_CONF", d.join("softhsm2.conf"))
            .output()
            .unwrap();
        assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
        write_mode(&d.join("pin"), &format!("{pin}\n"), 0o400);
        std::fs::create_dir(d.join("run")).unwrap();
        chmod(&d.join("run"), 0o750);
        let i = Install { dir, pin };
        i.write_config("keyhaven.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
        let out = i.keyhavend(&["init", "--config", "keyhaven.toml"], &[]);
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        i
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn socket(&self) -> PathBuf {
        self.dir().join("run/keyhaven.sock")
    }

    /// Writes a config `name` (mode 0600) with `hsm` lines in `[hsm]` and
    /// `top` lines at the top level.
    fn write_config(&self, name: &str, hsm: &str, top: &str) -> PathBuf {
        let text = format!(
            "{top}socket = \"run/keyhaven.sock\"\nstore = \"store\"\n\n[hsm]\nmodule = \"{}\"\n\
             token_label = \"prod\"\nsofthsm2_conf = \"softhsm2.conf\"\n{hsm}\n\
             [[policy.rules]]\nprincipals = [\"uid:{}\"]\noperations = [\"key-admin\", \"encrypt\", \"decrypt\"]\n\
             keys = [\"*\"]\n",
            softhsm_module().display(),
            my_uid()
        );
        let file = self.dir().join(name);
        write_mode(&file, &text, 0o600);
        file
    }

    /// Writes the config `file` (mode 0600, anywhere) naming every path
    /// absolutely: the install's socket, store, PIN file and token, and
    /// `module`.
    fn write_config_at(&self, file: &Path, module: &Path) {
        let d = self.dir().display();
        let text = format!(
            "socket = \"{d}/run/keyhaven.sock\"\nstore = \"{d}/store\"\n\n[hsm]\nmodule = \"{}\"\n\
             token_label = \"prod\"\nsofthsm2_conf = \"{d}/softhsm2.conf\"\npin_file = \"{d}/pin\"\n\
             allow_softhsm = true\n",
            module.display()
        );
        write_mode(file, &text, 0o600);
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(bin("keyhavend"));
        cmd.args(args)
            .current_dir(self.dir())
            .env_remove("SOFTHSM2_CONF")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("JOURNAL_STREAM")
            .env("KEYHAVEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `keyhavend ARGS` to its exit (at most 30 s).
    fn keyhavend(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let child = self.command(args, env).spawn().unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
        rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            signal(pid, "KILL");
            panic!("keyhavend {args:?} did not exit within 30 s")
        })
    }

    /// `keyhavend run --config NAME` must refuse; returns stderr.
    fn refused(&self, name: &str) -> String {
        let file = self.dir().join(name);
        let out = self.keyhavend(&["run", "--config", file.to_str().unwrap()], &[]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(78), "{name} must be refused with status 78 (EX_CONFIG):\n{err}");
        assert!(!self.socket().exists(), "{name}: a refusal must leave no socket");
        err
    }

    /// Starts `keyhavend ARGS` and waits until the socket answers.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut child = self.command(args, env).spawn().unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut out = child.stdout.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("keyhavend exited with {status}:\n{}", stderr.join().unwrap());
            }
            assert!(Instant::now() < deadline, "keyhavend did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Running { child: Some(child), stderr: Some(stderr) }
    }
}

struct Running {
    child: Option<Child>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM; returns (exit code, stderr).
    fn stop(mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().unwrap();
        signal(child.id(), "TERM");
        let status = child.wait().unwrap();
        (status.code(), self.stderr.take().unwrap().join().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn production_mode_refuses_each_weak_set_up_and_names_what_to_change() {
    let i = Install::new();
    let d = i.dir();

    // SoftHSM2 without `allow_softhsm = true`.
    i.write_config("softhsm.toml", "pin_file = \"pin\"\n", "");
    let err = i.refused("softhsm.toml");
    assert!(err.contains("SoftHSM2") && err.contains("allow_softhsm = true"), "{err}");
    assert!(err.contains("production mode refuses to start"), "{err}");

    // Weak PINs (judged before any login, so the token is never tried).
    for (n, pin) in ["", "1234", "0000", "123456", "changeme", "12345678", "zzzzzzzzzzzz", "3537363231383830"]
        .iter()
        .enumerate()
    {
        let file = d.join(format!("weak-pin-{n}"));
        write_mode(&file, &format!("{pin}\n"), 0o400);
        i.write_config(
            "weak.toml",
            &format!("pin_file = \"{}\"\nallow_softhsm = true\n", file.display()),
            "",
        );
        let err = i.refused("weak.toml");
        assert!(err.contains("user PIN is weak"), "`{pin}`: {err}");
        assert!(err.contains(&file.display().to_string()), "names where the PIN is: {err}");
        if pin.len() >= 6 {
            assert!(!err.contains(pin), "the PIN must not be printed: {err}");
        }
    }

    // An inline PIN: refused in every mode, naming the line, never echoing it.
    let file = i.write_config("inline.toml", "pin = \"inline-S3cret-77\"\nallow_softhsm = true\n", "");
    let line =
        std::fs::read_to_string(&file).unwrap().lines().position(|l| l.starts_with("pin =")).unwrap() + 1;
    let err = i.refused("inline.toml");
    assert!(err.contains("inline PIN is refused") && err.contains("pin_file"), "{err}");
    assert!(err.contains(&format!("line {line}, key `hsm.pin`")), "{err}");
    assert!(!err.contains("inline-S3cret-77"), "{err}");
    i.write_config("inline-dev.toml", "pin = \"inline-S3cret-77\"\n", "mode = \"dev\"\n");
    assert!(i.refused("inline-dev.toml").contains("inline PIN is refused"));

    // PIN file readable by others.
    chmod(&d.join("pin"), 0o644);
    i.write_config("ok.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let err = i.refused("ok.toml");
    assert!(err.contains("PIN file") && err.contains("0644") && err.contains("chmod 0400"), "{err}");
    chmod(&d.join("pin"), 0o400);

    // Socket directory readable or writable by others.
    for mode in [0o755, 0o753] {
        chmod(&d.join("run"), mode);
        let err = i.refused("ok.toml");
        assert!(err.contains("socket directory") && err.contains("chmod o-rw"), "{mode:o}: {err}");
    }
    chmod(&d.join("run"), 0o711);

    // Store directory readable by others.
    chmod(&d.join("store"), 0o755);
    let err = i.refused("ok.toml");
    assert!(err.contains("store directory") && err.contains("chmod 0700"), "{err}");
    chmod(&d.join("store"), 0o700);

    // Config file writable by others.
    chmod(&d.join("ok.toml"), 0o666);
    let err = i.refused("ok.toml");
    assert!(err.contains("config file") && err.contains("chmod go-w"), "{err}");
    chmod(&d.join("ok.toml"), 0o600);

    // Several problems at once are all listed.
    chmod(&d.join("store"), 0o777);
    i.write_config("two.toml", "pin_file = \"pin\"\n", "");
    let err = i.refused("two.toml");
    assert!(err.contains("allow_softhsm") && err.contains("store directory"), "{err}");
    chmod(&d.join("store"), 0o700);

    // Fixed: it starts.
    let running = i.start(&["run", "--config", "ok.toml"], &[]);
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(&i.pin));
}

#[test]
fn config_errors_name_the_file_line_and_key() {
    let i = Install::new();
    let file = i.write_config("types.toml", "pin_file = \"pin\"\nworkers = \"two\"\n", "");
    let line =
        std::fs::read_to_string(&file).unwrap().lines().position(|l| l.starts_with("workers")).unwrap() + 1;
    let err = i.refused("types.toml");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("hsm.workers"), "names the key: {err}");
    assert!(err.contains(&format!("line {line}")), "names line {line}: {err}");

    let file = i.write_config("range.toml", "pin_file = \"pin\"\nworkers = 0\n", "");
    let line =
        std::fs::read_to_string(&file).unwrap().lines().position(|l| l.starts_with("workers")).unwrap() + 1;
    let err = i.refused("range.toml");
    assert!(err.contains(&format!("line {line}, key `hsm.workers`")), "{err}");
    assert!(err.contains("\"auto\" or a number from 1 to 256"), "{err}");

    i.write_config("loaded.toml", "pin_file = \"pin\"\nloaded_keys = 0\n", "");
    let err = i.refused("loaded.toml");
    assert!(err.contains("key `hsm.loaded_keys`") && err.contains("from 1 to 1048576"), "{err}");

    i.write_config("gather.toml", "pin_file = \"pin\"\n[audit]\ncommit_gather_us = 20000\n", "");
    let err = i.refused("gather.toml");
    assert!(err.contains("key `audit.commit_gather_us`") && err.contains("from 0 to 10000"), "{err}");

    let file = i.write_config("mode.toml", "pin_file = \"pin\"\n", "mode = \"prod\"\n");
    let err = i.refused("mode.toml");
    assert!(err.contains(&file.display().to_string()) && err.contains("`mode`"), "{err}");
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn the_pin_comes_from_a_systemd_credential() {
    let i = Install::new();
    let creds = i.dir().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    chmod(&creds, 0o700);
    write_mode(&creds.join("pin"), &format!("{}\n", i.pin), 0o400);
    chmod(&i.dir().join("pin"), 0o000);
    i.write_config("cred.toml", "pin_credential = \"pin\"\nallow_softhsm = true\n", "");

    let err = i.refused("cred.toml");
    assert!(err.contains("CREDENTIALS_DIRECTORY") && err.contains("LoadCredential"), "{err}");

    let creds_s = creds.display().to_string();
    let running = i.start(&["run", "--config", "cred.toml"], &[("CREDENTIALS_DIRECTORY", &creds_s)]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::connect(&i.socket()).await.unwrap();
        assert_eq!(c.health().await.unwrap().status, "ok");
    });
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");

    // Both a file and a credential: refused.
    i.write_config("both.toml", "pin_credential = \"pin\"\npin_file = \"pin\"\nallow_softhsm = true\n", "");
    let err = i.refused("both.toml");
    assert!(err.contains("pin_credential") && err.contains("pin_file"), "{err}");
}

/// Core dumps are off in the running daemon, logs can be JSON, and the PIN
/// appears nowhere in the output even at trace level, on success and on
/// failure (a wrong PIN, a weak PIN).
#[test]
fn no_core_dumps_json_logs_and_the_pin_never_prints() {
    let i = Install::new();
    i.write_config("ok.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let env = [("KEYHAVEN_LOG", "trace")];
    let running = i.start(&["--log-format", "json", "run", "--config", "ok.toml"], &env);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", running.pid())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "RLIMIT_CORE must be 0 (soft and hard): {core}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::connect(&i.socket()).await.unwrap();
        c.key_create(&path("acme/pii")).await.unwrap();
        let enc = c.encrypt(&path("acme/pii"), b"json-log-plaintext", &ctx(&[])).await.unwrap();
        c.decrypt(&enc.ciphertext, &ctx(&[])).await.unwrap();
    });
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(&i.pin), "the PIN appears in the trace log");
    assert!(!log.contains("json-log-plaintext"));
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{log}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
    assert!(
        log.contains("memory locked") || log.contains("memory not locked"),
        "the memory-lock outcome is logged: {log}"
    );

    // Under systemd (stderr is the journal that JOURNAL_STREAM names): no timestamps.
    let (code, log) = run_with_journal(&i, &["run", "--config", "ok.toml"], true, true);
    assert_eq!(code, Some(0), "{log}");
    let first = log.lines().next().unwrap_or_default();
    assert!(!first.contains(" 20"), "no timestamp under systemd: {first}");
    assert!(first.starts_with("<6> INFO") || first.starts_with("<4> WARN"), "{first}");

    // A wrong PIN: the refusal names the problem, not the PIN.
    let wrong = i.dir().join("wrong-pin");
    let wrong_pin = random_hex(16);
    write_mode(&wrong, &format!("{wrong_pin}\n"), 0o400);
    i.write_config("wrong.toml", &format!("pin_file = \"{}\"\nallow_softhsm = true\n", wrong.display()), "");
    let out = i.keyhavend(&["--log-format", "json", "run", "--config", "wrong.toml"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("PIN is incorrect"), "{err}");
    assert!(!err.contains(&wrong_pin) && !err.contains(&i.pin), "{err}");
}

fn chown(path: &Path, user: &TestUser) {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).unwrap();
}

/// Issue 13 §6: production mode checks owners as well as modes, for the
/// config file, the PKCS#11 module, the PIN file and the socket and store
/// directories, and for every directory on the way to each up to `/` (as
/// written and with links resolved). Each refusal names the path, the
/// owner or mode found and what is required. An unprivileged user who
/// owns the config (the policy, `[hsm] module`), the module (the code the
/// PIN is handed to) or a directory above them could otherwise take the
/// PIN or the keys.
#[test]
fn production_mode_checks_owners_and_every_directory_up_the_path() {
    let i = Install::new();
    let d = i.dir();
    let dave = ensure_user("khtest-dave", &[]);
    let owned_by_dave = format!("belongs to uid {} (khtest-dave)", dave.uid);

    // The config owned by an unprivileged user, even at 0644.
    let config = d.join("ok.toml");
    i.write_config("ok.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    chmod(&config, 0o644);
    chown(&config, &dave);
    let err = i.refused("ok.toml");
    assert!(err.contains(&format!("the config file {} {owned_by_dave}", config.display())), "{err}");
    assert!(err.contains("must belong to root or to the daemon's user (uid 0)"), "{err}");
    assert!(err.contains("chown root"), "{err}");
    std::os::unix::fs::lchown(&config, Some(0), Some(0)).unwrap();

    // The config in a world-writable directory (not sticky), or in one an
    // unprivileged user owns.
    let open = d.join("open");
    std::fs::create_dir(&open).unwrap();
    i.write_config_at(&open.join("k.toml"), &softhsm_module());
    chmod(&open, 0o777);
    let err = i.refused("open/k.toml");
    assert!(
        err.contains(&format!(
            "{}, on the way to the config file {}",
            open.display(),
            open.join("k.toml").display()
        )),
        "{err}"
    );
    assert!(err.contains("has mode 0777") && err.contains("sticky") && err.contains("chmod go-w"), "{err}");
    chmod(&open, 0o755);
    chown(&open, &dave);
    let err = i.refused("open/k.toml");
    assert!(err.contains(&format!("{}, on the way to the config file", open.display())), "{err}");
    assert!(err.contains(&owned_by_dave) && err.contains("every directory up to /"), "{err}");
    std::os::unix::fs::lchown(&open, Some(0), Some(0)).unwrap();

    // The module: world-writable, owned by an unprivileged user, in a
    // directory others may write, or reached by a link through one.
    let lib = d.join("lib");
    std::fs::create_dir(&lib).unwrap();
    let module = lib.join("libsofthsm2.so");
    std::fs::copy(softhsm_module(), &module).unwrap();
    chmod(&module, 0o666);
    i.write_config_at(&d.join("module.toml"), &module);
    let err = i.refused("module.toml");
    assert!(err.contains(&format!("the PKCS#11 module {} has mode 0666", module.display())), "{err}");
    assert!(
        err.contains("must not be writable by its group or others") && err.contains("chmod go-w"),
        "{err}"
    );
    chmod(&module, 0o755);
    chown(&module, &dave);
    let err = i.refused("module.toml");
    assert!(err.contains(&format!("the PKCS#11 module {} {owned_by_dave}", module.display())), "{err}");
    std::os::unix::fs::lchown(&module, Some(0), Some(0)).unwrap();
    chmod(&lib, 0o775);
    let err = i.refused("module.toml");
    assert!(err.contains(&format!("{}, on the way to the PKCS#11 module", lib.display())), "{err}");
    assert!(err.contains("has mode 0775"), "{err}");
    chmod(&lib, 0o755);
    let daves = d.join("daves");
    std::fs::create_dir(&daves).unwrap();
    std::fs::copy(softhsm_module(), daves.join("libsofthsm2.so")).unwrap();
    chown(&daves, &dave);
    std::os::unix::fs::symlink(daves.join("libsofthsm2.so"), lib.join("link.so")).unwrap();
    i.write_config_at(&d.join("link.toml"), &lib.join("link.so"));
    let err = i.refused("link.toml");
    assert!(
        err.contains(&format!(
            "{}, on the way to the PKCS#11 module {}",
            daves.display(),
            lib.join("link.so").display()
        )),
        "a link is followed: {err}"
    );

    // The PIN file in a directory an unprivileged user owns.
    let pins = d.join("pins");
    std::fs::create_dir(&pins).unwrap();
    write_mode(&pins.join("pin"), &format!("{}\n", i.pin), 0o400);
    chown(&pins, &dave);
    i.write_config(
        "pins.toml",
        &format!("pin_file = \"{}\"\nallow_softhsm = true\n", pins.join("pin").display()),
        "",
    );
    let err = i.refused("pins.toml");
    assert!(err.contains(&format!("{}, on the way to the PIN file", pins.display())), "{err}");
    assert!(err.contains(&owned_by_dave), "{err}");

    // Socket and store directories: group-writable (0770), or owned by an
    // unprivileged user.
    chmod(&d.join("run"), 0o770);
    let err = i.refused("ok.toml");
    assert!(
        err.contains(&format!("the socket directory {} has mode 0770", d.join("run").display())),
        "{err}"
    );
    assert!(err.contains("must not be writable by its group"), "{err}");
    chmod(&d.join("run"), 0o750);
    chown(&d.join("run"), &dave);
    let err = i.refused("ok.toml");
    assert!(
        err.contains(&format!("the socket directory {} {owned_by_dave}", d.join("run").display())),
        "{err}"
    );
    std::os::unix::fs::lchown(d.join("run"), Some(0), Some(0)).unwrap();
    chmod(&d.join("store"), 0o770);
    let err = i.refused("ok.toml");
    assert!(
        err.contains(&format!("the store directory {} has mode 0770", d.join("store").display())),
        "{err}"
    );
    assert!(err.contains("chmod 0700"), "{err}");
    chmod(&d.join("store"), 0o700);

    // A directory shared by several checked paths is named once, with all
    // of them.
    chmod(d, 0o777);
    let err = i.refused("ok.toml");
    assert_eq!(err.matches(&format!("{}, on the way to", d.display())).count(), 1, "{err}");
    assert!(
        err.contains("the config file")
            && err.contains("the PIN file")
            && err.contains("the store directory"),
        "{err}"
    );
    chmod(d, 0o700);

    // Fixed, with the config in a sticky directory of root's (like /tmp,
    // which holds this whole install) and the module copy: it starts.
    chmod(&open, 0o1777);
    i.write_config_at(&open.join("k.toml"), &module);
    let running = i.start(&["run", "--config", "open/k.toml"], &[]);
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
}

/// Issue 13 §6: PINs that passed the old length-and-trivial-pattern rule
/// are refused by the strength rule (common words, leet, keyboard walks,
/// repeated stretches); a random 16-character PIN is accepted, and the
/// daemon starts with it.
#[test]
fn production_mode_refuses_common_and_patterned_pins_and_accepts_a_random_one() {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
    let random: String = bytes.iter().map(|b| ALNUM[*b as usize % ALNUM.len()] as char).collect();
    let i = Install::with_pin(&random);
    let d = i.dir();
    for (n, pin) in
        ["qwertyuiop", "password1234", "123123123", "P@ssw0rd2024!", "1qaz2wsx", "Xk9Xk9Xk9Xk9", "asdfghjkl;"]
            .iter()
            .enumerate()
    {
        let file = d.join(format!("weak-pin-{n}"));
        write_mode(&file, &format!("{pin}\n"), 0o400);
        i.write_config(
            "weak.toml",
            &format!("pin_file = \"{}\"\nallow_softhsm = true\n", file.display()),
            "",
        );
        let err = i.refused("weak.toml");
        assert!(err.contains("user PIN is weak") && err.contains("OPERATIONS.md §1.7"), "`{pin}`: {err}");
        assert!(!err.contains(pin), "the PIN must not be printed: {err}");
    }
    i.write_config("ok.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let running = i.start(&["run", "--config", "ok.toml"], &[]);
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains(&random));
}

/// Issue 13 §6: a config syntax error on or near an inline `pin = "…"`
/// line is reported by line and column; the error never quotes the line.
#[test]
fn a_config_syntax_error_never_quotes_a_pin_line() {
    let i = Install::new();
    let secret = "Inl1ne-S3cret-PIN-93";
    for (n, hsm) in [
        format!("pin = \"{secret}\n"),
        format!("pin = {secret}\n"),
        format!("pin = \"{secret}\" trailing\n"),
        format!("pin = \"{secret}\\q\"\n"),
        format!("pin = \"{secret}\"\nworkers = = 1\n"),
        format!("workers = 1 1\npin = \"{secret}\"\n"),
        format!("pin_file = {secret}\n"),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("syntax-{n}.toml");
        let file = i.write_config(&name, hsm, "");
        let text = std::fs::read_to_string(&file).unwrap();
        let line = text.lines().position(|l| l.contains(secret)).unwrap() + 1;
        let err = i.refused(&name);
        assert!(!err.contains(secret) && !err.contains("S3cret"), "{hsm:?}: the PIN is quoted: {err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        let near = [line - 1, line, line + 1].iter().any(|l| err.contains(&format!("line {l}, column")));
        assert!(near, "{hsm:?}: names the line ({line}) and column: {err}");
    }
}

// ---- Issue 14: a production install on a systemd host ----

/// The text of `systemd/NAME`.
fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `KEY=` lines in a unit (comments skipped).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

/// Runs `keyhavend ARGS` to its exit with stderr on a socket; with
/// `journal`, `$JOURNAL_STREAM` names that socket (as systemd names the
/// journal's stream), else it names something else. `until_listening`:
/// once the socket answers, SIGTERM it. Returns (exit code, stderr).
fn run_with_journal(
    i: &Install,
    args: &[&str],
    journal: bool,
    until_listening: bool,
) -> (Option<i32>, String) {
    use std::os::unix::fs::MetadataExt;
    // The journal's stream is a Unix stream socket, like this one.
    let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(writer));
    let meta = file.metadata().unwrap();
    let stream = if journal { format!("{}:{}", meta.dev(), meta.ino()) } else { "8:1234".to_owned() };
    let mut cmd = i.command(args, &[("JOURNAL_STREAM", &stream)]);
    cmd.stderr(Stdio::from(file));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = reader.read_to_string(&mut s);
        s
    });
    if until_listening {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(i.socket()).is_err() {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "keyhavend did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill").arg(child.id().to_string()).status();
    }
    let status = child.wait().unwrap();
    (status.code(), stderr.join().unwrap())
}

/// The pkcs11-spy module of OpenSC (opensc-pkcs11): it logs every call
/// made to the module it stands in front of.
fn pkcs11_spy() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11-spy.so",
        "/usr/lib/pkcs11-spy.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("pkcs11-spy.so is missing: install opensc-pkcs11 (softhsm/install.sh does)")
}

/// Issue 14 §2: a wrong PIN is presented to the token once (counted by
/// pkcs11-spy between the daemon and SoftHSM2) and the start exits 78
/// (EX_CONFIG), which the unit does not restart on; a token that is not
/// there exits 69, which it does restart on.
#[test]
fn a_wrong_pin_exits_78_after_one_login_and_the_unit_does_not_restart_on_78() {
    let service = unit("keyhavend.service");
    let prevent: Vec<String> = unit_values(&service, "RestartPreventExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(prevent.iter().any(|s| s == "78"), "RestartPreventExitStatus= must hold 78: {prevent:?}");
    assert!(!prevent.iter().any(|s| s == "69" || s == "75"), "{prevent:?}");
    assert_eq!(unit_values(&service, "Restart"), ["on-failure"]);

    let i = Install::new();
    let wrong = i.dir().join("wrong-pin");
    write_mode(&wrong, &format!("{}\n", random_hex(16)), 0o400);
    let file = i.write_config("spy.toml", "pin_file = \"wrong-pin\"\n", "");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(&softhsm_module().display().to_string(), &pkcs11_spy().display().to_string());
    write_mode(&file, &text, 0o600);
    let spy_log = i.dir().join("spy.log");
    let module = softhsm_module();
    let env = [("PKCS11SPY", module.to_str().unwrap()), ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap())];
    let out = i.keyhavend(&["run", "--config", "spy.toml"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "a wrong PIN exits 78 (EX_CONFIG): {err}");
    assert!(err.contains("PIN is incorrect"), "{err}");
    let calls = std::fs::read_to_string(&spy_log).unwrap();
    let logins = calls.lines().filter(|l| l.contains("C_Login")).count();
    assert_eq!(logins, 1, "exactly one login attempt:\n{calls}");
    assert!(!err.contains(&i.pin), "{err}");

    // A token that is not there (yet): 69, which the unit retries.
    let file = i.write_config("absent.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let text =
        std::fs::read_to_string(&file).unwrap().replace("token_label = \"prod\"", "token_label = \"absent\"");
    write_mode(&file, &text, 0o600);
    let out = i.keyhavend(&["run", "--config", "absent.toml"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "token absent exits 69 (EX_UNAVAILABLE): {err}");
    assert!(err.contains("no token labelled `absent`"), "{err}");
}

/// Issue 14 §1: the socket unit's directory, made by systemd as root:root
/// with its `DirectoryMode=`, and the socket's `SocketGroup=` and
/// `SocketMode=`: a user in the group is served, one outside it is not,
/// and the production check accepts the directory.
#[test]
fn the_socket_units_directory_lets_the_clients_group_in_and_no_one_else() {
    let socket_unit = unit("keyhavend.socket");
    let value = |key: &str| unit_values(&socket_unit, key).pop().unwrap_or_else(|| panic!("{key}= missing"));
    let dir_mode = u32::from_str_radix(&value("DirectoryMode"), 8).unwrap();
    let socket_mode = u32::from_str_radix(&value("SocketMode"), 8).unwrap();
    let group = value("SocketGroup");
    ensure_group(&group);
    let member = ensure_user("kh-sock-member", &[&group]);
    let outsider = ensure_user("kh-sock-outsider", &[]);

    let i = Install::new();
    chmod(i.dir(), 0o711);
    chmod(&i.dir().join("run"), dir_mode);
    i.write_config(
        "group.toml",
        "pin_file = \"pin\"\nallow_softhsm = true\n",
        &format!("socket_group = \"{group}\"\nsocket_mode = 0o{socket_mode:o}\n"),
    );
    let running = i.start(&["run", "--config", "group.toml"], &[]);
    // As a login would run it: the user's uid, its primary group and every
    // group it is in.
    let as_user = |user: &TestUser| {
        Command::new("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--init-groups")
            .arg(bin("keyhaven"))
            .arg("--socket")
            .arg(i.socket())
            .arg("whoami")
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = as_user(&member);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "a user in `{group}` is served (directory {dir_mode:04o}): {text}");
    assert!(text.contains("kh-sock-member"), "{text}");
    let out = as_user(&outsider);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a user outside `{group}` is refused");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
}

/// Issue 14 §4: when stderr is the journal (`$JOURNAL_STREAM` names it),
/// every line carries its priority as an sd-daemon prefix, so that
/// `journalctl -p warning` shows the warnings; elsewhere, no prefixes.
#[test]
fn log_lines_carry_their_priority_to_the_journal() {
    let i = Install::new();
    let file = i.write_config("journal.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("\n[[policy.rules]]\nprincipals = [\"user:kh-no-such-user\"]\noperations = [\"encrypt\"]\nkeys = [\"*\"]\n");
    write_mode(&file, &text, 0o600);

    let (code, log) = run_with_journal(&i, &["run", "--config", "journal.toml"], true, true);
    assert_eq!(code, Some(0), "{log}");
    for line in log.lines().filter(|l| !l.is_empty()) {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].iter().any(|p| line.starts_with(p)),
            "no priority: {line}\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.starts_with("<4>") && l.contains("WARN") && l.contains("kh-no-such-user")),
        "a warning at priority 4: {log}"
    );
    assert!(log.lines().any(|l| l.starts_with("<6>") && l.contains("listening")), "{log}");

    // A failed start: the last word is an error, every line of it prefixed.
    let wrong = i.dir().join("wrong-pin");
    write_mode(&wrong, &format!("{}\n", random_hex(16)), 0o400);
    i.write_config("wrong.toml", "pin_file = \"wrong-pin\"\nallow_softhsm = true\n", "");
    let (code, log) = run_with_journal(&i, &["run", "--config", "wrong.toml"], true, false);
    assert_eq!(code, Some(78), "{log}");
    assert!(log.lines().any(|l| l.starts_with("<3>keyhavend: ") && l.contains("PIN is incorrect")), "{log}");
    chmod(&i.dir().join("store"), 0o777);
    let (code, log) = run_with_journal(&i, &["run", "--config", "journal.toml"], true, false);
    chmod(&i.dir().join("store"), 0o700);
    assert_eq!(code, Some(78), "{log}");
    let refusal: Vec<&str> = log.lines().skip_while(|l| !l.contains("production mode refuses")).collect();
    assert!(refusal.len() >= 2 && refusal.iter().all(|l| l.starts_with("<3>")), "{log}");

    // JOURNAL_STREAM inherited, stderr elsewhere: plain lines.
    let (code, log) = run_with_journal(&i, &["run", "--config", "journal.toml"], false, true);
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.lines().any(|l| l.starts_with('<')), "{log}");
}

/// Issue 14 §6: the unit's `ExecReload=` waits for the daemon's answer and
/// fails when the new policy is refused (the old one stays in force), and
/// succeeds when it is taken.
#[test]
fn the_units_reload_command_fails_when_the_new_policy_is_refused() {
    let i = Install::new();
    let good = i.write_config("reload.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let good_text = std::fs::read_to_string(&good).unwrap();
    let running = i.start(&["run", "--config", "reload.toml"], &[]);
    let exec = unit_values(&unit("keyhavend.service"), "ExecReload").pop().expect("ExecReload=");
    let pid = running.pid().to_string();
    let argv: Vec<String> = exec
        .split_whitespace()
        .map(|a| match a {
            "/usr/local/bin/keyhaven" => bin("keyhaven").display().to_string(),
            "/run/keyhaven/keyhaven.sock" => i.socket().display().to_string(),
            "$MAINPID" => pid.clone(),
            other => other.to_owned(),
        })
        .collect();
    let reload = || Command::new(&argv[0]).args(&argv[1..]).env_remove("KEYHAVEN_SOCKET").output().unwrap();

    // A policy that does not compile: reload fails, naming why.
    let broken = good_text.replace("\"decrypt\"]", "\"decrypt\", \"no-such-operation\"]");
    assert_ne!(broken, good_text);
    write_mode(&good, &broken, 0o600);
    let out = reload();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`{exec}` must fail on a refused policy: {err}");
    assert!(err.contains("no-such-operation") && err.contains("invalid_config"), "{err}");
    // The old policy is in force.
    let out = run_cli(&i.socket(), &["key", "create", "acme/reload"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A good one: reload succeeds and the new rule is in force.
    let mut text = good_text.clone();
    text.push_str(&format!(
        "\n[[policy.rules]]\nprincipals = [\"uid:{}\"]\noperations = [\"datakey\"]\nkeys = [\"*\"]\n",
        my_uid()
    ));
    write_mode(&good, &text, 0o600);
    let out = reload();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_cli(&i.socket(), &["datakey", "acme/reload"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
}

/// Issue 14: `keyhavend check` lists every problem `run` would meet, at
/// once, and exits 78; it passes (0) a config that `run` starts with.
#[test]
fn keyhavend_check_lists_every_problem_at_once_and_passes_what_run_starts() {
    let i = Install::new();
    i.write_config("ok.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let out = i.keyhavend(&["check", "--config", "ok.toml"], &[]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(": ok") && text.contains("not checked"), "{text}");
    assert!(!i.socket().exists(), "check starts nothing");
    let (code, log) = i.start(&["run", "--config", "ok.toml"], &[]).stop();
    assert_eq!(code, Some(0), "{log}");

    // Four problems at once: SoftHSM2 not allowed, a weak PIN, a store
    // open to others, a token that is not there.
    write_mode(&i.dir().join("weak-pin"), "12345678\n", 0o400);
    let file = i.write_config("bad.toml", "pin_file = \"weak-pin\"\n", "");
    let text =
        std::fs::read_to_string(&file).unwrap().replace("token_label = \"prod\"", "token_label = \"absent\"");
    write_mode(&file, &text, 0o600);
    chmod(&i.dir().join("store"), 0o777);
    let out = i.keyhavend(&["check", "--config", "bad.toml"], &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{err}");
    for what in
        ["allow_softhsm", "user PIN is weak", "store directory", "no token labelled `absent`", "4 problems"]
    {
        assert!(err.contains(what), "`{what}` missing: {err}");
    }
    assert!(!err.contains("12345678"), "{err}");
    // `run` refuses it too.
    i.refused("bad.toml");
    chmod(&i.dir().join("store"), 0o700);

    let file =
        i.write_config("module.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "store = \"no-store\"\n");
    let text = std::fs::read_to_string(&file).unwrap().replacen("store = \"store\"\n", "", 1).replace(
        &softhsm_module().display().to_string(),
        &i.dir().join("missing-pkcs11.so").display().to_string(),
    );
    write_mode(&file, &text, 0o600);
    let out = i.keyhavend(&["check", "--config", "module.toml"], &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("missing-pkcs11.so") && err.contains("cannot be loaded"), "{err}");
    assert!(err.contains("no-store") && err.contains("keyhavend init"), "{err}");

    // A config that does not parse: 78, naming the line.
    i.write_config("parse.toml", "pin_file = \"pin\"\nworkers = \"two\"\n", "");
    let out = i.keyhavend(&["check", "--config", "parse.toml"], &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("hsm.workers") && err.contains("line"), "{err}");
}

/// Issue 14 §8: SoftHSM2's token files on a read-only file system (what
/// `ProtectSystem=strict` makes of them without `ReadWritePaths=`):
/// `check` names the file, the cause and the unit line that fixes it, and
/// so does `run`, whose SoftHSM2 says only "no token labelled … is
/// present", with exit 78.
#[test]
fn check_names_softhsm_token_files_on_a_read_only_file_system() {
    let i = Install::new();
    i.write_config("ok.toml", "pin_file = \"pin\"\nallow_softhsm = true\n", "");
    let tokens = i.dir().join("tokens");
    let t = tokens.display().to_string();
    let script = format!(
        "mount --bind {t} {t} && mount -o remount,bind,ro {t} && exec {} check --config ok.toml",
        bin("keyhavend").display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &script])
        .current_dir(i.dir())
        .env_remove("SOFTHSM2_CONF")
        .env_remove("JOURNAL_STREAM");
    let out = cmd.output().expect("unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if err.contains("unshare failed") || err.contains("mount: ") && !err.contains("keyhavend") {
        panic!("this test needs `unshare -m` and `mount` (root with CAP_SYS_ADMIN): {err}");
    }
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("SoftHSM2 could not open its token files"), "{err}");
    assert!(err.contains("Read-only file system") && err.contains(&format!("ReadWritePaths={t}")), "{err}");

    // `run` on the same read-only token: it fails, and says why.
    let script = script.replace(" check --config ok.toml", " run --config ok.toml");
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .current_dir(i.dir())
        .env_remove("SOFTHSM2_CONF")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // An operator must fix it: 78, not the 69 of a token that is merely absent.
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("SoftHSM2 could not open its token files") && err.contains("Read-only file system"),
        "{err}"
    );
}

/// Issue 14 §2: a PIN the token refused at start is not presented again by
/// later starts (a restart, or the socket unit starting the service at the
/// next connection) until the PIN changes or an operator removes the note;
/// `check` reports it; the right PIN is tried once and clears it.
#[test]
fn a_refused_pin_is_not_presented_again_until_it_changes() {
    let i = Install::new();
    let wrong = i.dir().join("wrong-pin");
    write_mode(&wrong, &format!("{}\n", random_hex(16)), 0o400);
    let file = i.write_config("spy.toml", "pin_file = \"wrong-pin\"\n", "");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(&softhsm_module().display().to_string(), &pkcs11_spy().display().to_string());
    write_mode(&file, &text, 0o600);
    let module = softhsm_module();
    let run = |n: usize, args: &[&str]| {
        let log = i.dir().join(format!("spy-{n}.log"));
        let env = [("PKCS11SPY", module.to_str().unwrap()), ("PKCS11SPY_OUTPUT", log.to_str().unwrap())];
        let out = i.keyhavend(args, &env);
        let logins = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("C_Login"))
            .count();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), logins)
    };
    let (code, err, logins) = run(1, &["run", "--config", "spy.toml"]);
    assert_eq!((code, logins), (Some(78), 1), "{err}");
    let note = i.dir().join("store/login-refused");
    assert!(note.exists(), "{err}");
    let noted = std::fs::read_to_string(&note).unwrap();
    let wrong_pin = std::fs::read_to_string(&wrong).unwrap();
    assert!(!noted.contains(wrong_pin.trim()) && !noted.contains(&i.pin), "{noted}");

    // Started again with the same PIN: refused before any login.
    for n in 2..4 {
        let (code, err, logins) = run(n, &["run", "--config", "spy.toml"]);
        assert_eq!((code, logins), (Some(78), 0), "start {n} presented the refused PIN again: {err}");
        assert!(err.contains("refused this PIN at") && err.contains(&note.display().to_string()), "{err}");
    }
    let (code, err, logins) = run(4, &["check", "--config", "spy.toml"]);
    assert_eq!((code, logins), (Some(78), 0), "{err}");
    assert!(err.contains("refused this PIN at"), "{err}");

    // The PIN source changes (the right PIN): tried once, it starts, and the note goes.
    write_mode(&wrong, &format!("{}\n", i.pin), 0o400);
    let (code, err, logins) = run(5, &["check", "--config", "spy.toml"]);
    assert_eq!((code, logins), (Some(0), 0), "{err}");
    let log6 = i.dir().join("spy-6.log");
    let env = [("PKCS11SPY", module.to_str().unwrap()), ("PKCS11SPY_OUTPUT", log6.to_str().unwrap())];
    let running = i.start(&["run", "--config", "spy.toml"], &env);
    assert!(!note.exists(), "a login that went through removes the note");
    let (code, log) = running.stop();
    assert_eq!(code, Some(0), "{log}");
    let logins = std::fs::read_to_string(&log6).unwrap().lines().filter(|l| l.contains("C_Login")).count();
    assert_eq!(logins, 1, "the changed PIN is tried once");
}
