//! The access policy against real processes under real uids and gids: the
//! suite runs as root and starts the `keyhaven` CLI as users it creates
//! (docs/POLICY.md). The daemon takes identity from SO_PEERCRED and the
//! user database, so these are the real thing end to end.

use std::process::Output;

use keyhaven_tests::*;

/// Users and groups shared by these tests (created once, idempotently).
struct People {
    alice: TestUser,
    bob: TestUser,
    carol: TestUser,
    dave: TestUser,
}

fn people() -> People {
    People {
        alice: ensure_user("khtest-alice", &[]),
        bob: ensure_user("khtest-bob", &["khtest-billing"]),
        carol: ensure_user("khtest-carol", &["khtest-audit"]),
        dave: ensure_user("khtest-dave", &[]),
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(out.status.success(), "expected success, got {}: {}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a `permission_denied` that names the operation and the key.
#[track_caller]
fn denied(out: Output, op: &str, what: &str) -> String {
    let t = text(&out);
    assert!(!out.status.success(), "expected a refusal of `{op}` on {what}: {t}");
    assert!(t.contains("(permission_denied)"), "expected permission_denied: {t}");
    assert!(
        t.contains(&format!("`{op}`")) && t.contains(what),
        "the refusal must name `{op}` and {what}: {t}"
    );
    t
}

/// The message without the process id (which differs between two runs).
fn no_pid(s: &str) -> String {
    match s.find(" pid=") {
        Some(at) => {
            let rest = &s[at + 5..];
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            format!("{}{}", &s[..at], &rest[digits..])
        }
        None => s.to_owned(),
    }
}

const ROOT_ADMIN: &str = r#"
[[policy.rules]]
name = "operators"
principals = ["uid:0"]
operations = ["key-admin", "admin", "audit-read"]
keys = ["*"]
"#;

fn rules(p: &People) -> String {
    format!(
        r#"{ROOT_ADMIN}
[[policy.rules]]
principals = ["user:{}"]
operations = ["encrypt", "decrypt"]
keys = ["acme/*"]

[[policy.rules]]
name = "billing apps"
principals = ["group:khtest-billing"]
operations = ["datakey", "decrypt"]
keys = ["*/pii"]

[[policy.rules]]
principals = ["gid:{}"]
operations = ["audit-read"]
keys = ["acme/*"]
"#,
        p.alice.name,
        ensure_group("khtest-audit"),
    )
}

async fn daemon_with_keys(policy: &str) -> TestDaemon {
    let mut d = TestDaemon::start();
    {
        let c = d.client().await;
        for k in ["acme/pii", "acme/smtp", "beta/pii", "beta/smtp"] {
            c.key_create(&path(k)).await.unwrap();
        }
    }
    d.write_policy(policy);
    d.restart();
    d
}

#[tokio::test(flavor = "multi_thread")]
async fn each_operation_is_allowed_where_granted_and_denied_otherwise() {
    let p = people();
    let d = daemon_with_keys(&rules(&p)).await;
    let s = d.socket();

    // alice (user:): encrypt and decrypt on acme/*, nothing else.
    let ct = ok(run_cli_as(&p.alice, s, &["encrypt", "acme/pii", "--context", "row=1"], b"alice's secret"));
    let ct = ct.trim().to_owned();
    let back = ok(run_cli_as(&p.alice, s, &["decrypt", "--context", "row=1"], ct.as_bytes()));
    assert_eq!(back, "alice's secret");
    ok(run_cli_as(&p.alice, s, &["encrypt", "acme/smtp"], b"x"));
    denied(run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x"), "encrypt", "`beta/pii`");
    denied(run_cli_as(&p.alice, s, &["datakey", "acme/pii"], b""), "datakey", "`acme/pii`");
    denied(run_cli_as(&p.alice, s, &["key", "create", "acme/new"], b""), "key_create", "`acme/new`");
    denied(run_cli_as(&p.alice, s, &["key", "list", "acme"], b""), "key_list", "tenant `acme`");
    denied(run_cli_as(&p.alice, s, &["key", "list"], b""), "key_list", "every tenant");
    denied(run_cli_as(&p.alice, s, &["audit", "tail"], b""), "audit_read", "every tenant");
    denied(run_cli_as(&p.alice, s, &["admin", "reload"], b""), "admin_reload", "every tenant");

    // bob (group:khtest-billing, a supplementary group): datakey and decrypt on */pii.
    let dk = ok(run_cli_as(&p.bob, s, &["datakey", "beta/pii", "--no-plaintext"], b""));
    let env: serde_json::Value = serde_json::from_str(&dk).unwrap();
    let env = env["envelope"].as_str().unwrap();
    ok(run_cli_as(&p.bob, s, &["datakey", "decrypt"], env.as_bytes()));
    // A ciphertext alice made under acme/pii: bob's */pii decrypt grant covers it.
    assert_eq!(
        ok(run_cli_as(&p.bob, s, &["decrypt", "--context", "row=1"], ct.as_bytes())),
        "alice's secret"
    );
    denied(run_cli_as(&p.bob, s, &["encrypt", "acme/pii"], b"x"), "encrypt", "`acme/pii`");
    denied(run_cli_as(&p.bob, s, &["datakey", "beta/smtp"], b""), "datakey", "`beta/smtp`");
    let smtp_ct = ok(run_cli_as(&p.alice, s, &["encrypt", "acme/smtp"], b"smtp"));
    denied(run_cli_as(&p.bob, s, &["decrypt"], smtp_ct.trim().as_bytes()), "decrypt", "`acme/smtp`");

    // carol (gid: of a supplementary group): audit-read on acme/* reads acme only.
    let acme = ok(run_cli_as(&p.carol, s, &["audit", "tail", "--tenant", "acme", "--json"], b""));
    assert!(!acme.is_empty() && acme.lines().all(|l| l.contains(r#""tenant":"acme""#)), "{acme}");
    denied(
        run_cli_as(&p.carol, s, &["audit", "tail", "--tenant", "beta"], b""),
        "audit_read",
        "tenant `beta`",
    );
    denied(run_cli_as(&p.carol, s, &["audit", "verify"], b""), "audit_verify", "every tenant");
    denied(run_cli_as(&p.carol, s, &["decrypt"], ct.as_bytes()), "decrypt", "`acme/pii`");

    // dave: named by no rule; only the free operations work.
    ok(run_cli_as(&p.dave, s, &["health"], b""));
    let who: serde_json::Value = serde_json::from_str(&ok(run_cli_as(&p.dave, s, &["whoami"], b""))).unwrap();
    assert_eq!(who["uid"], p.dave.uid);
    assert_eq!(who["user"], p.dave.name);
    assert_eq!(who["grants"], serde_json::json!([]));
    denied(run_cli_as(&p.dave, s, &["decrypt"], ct.as_bytes()), "decrypt", "`acme/pii`");

    // root gets nothing it is not granted: key-admin yes, use of keys no.
    ok(run_cli(s, &["key", "list"], b""));
    denied(run_cli(s, &["encrypt", "acme/pii"], b"x"), "encrypt", "`acme/pii`");
    denied(run_cli(s, &["decrypt"], ct.as_bytes()), "decrypt", "`acme/pii`");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denial_does_not_reveal_whether_the_key_exists() {
    let p = people();
    let d = daemon_with_keys(&rules(&p)).await;
    let s = d.socket();
    let existing = denied(run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x"), "encrypt", "`beta/pii`");
    let missing = denied(run_cli_as(&p.alice, s, &["encrypt", "beta/nope"], b"x"), "encrypt", "`beta/nope`");
    assert_eq!(no_pid(&existing.replace("beta/pii", "K")), no_pid(&missing.replace("beta/nope", "K")));
    let missing_tenant =
        denied(run_cli_as(&p.alice, s, &["encrypt", "nosuch/pii"], b"x"), "encrypt", "`nosuch/pii`");
    assert_eq!(
        no_pid(&existing.replace("beta/pii", "K")),
        no_pid(&missing_tenant.replace("nosuch/pii", "K"))
    );
    // Where alice may, a missing key is simply not found.
    let t = text(&run_cli_as(&p.alice, s, &["encrypt", "acme/nope"], b"x"));
    assert!(t.contains("(not_found)"), "{t}");
}

#[tokio::test(flavor = "multi_thread")]
async fn whoami_shows_identity_groups_and_grants() {
    let p = people();
    let d = daemon_with_keys(&rules(&p)).await;
    let out = ok(run_cli_as(&p.bob, d.socket(), &["whoami"], b""));
    let who: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(who["uid"], p.bob.uid);
    assert_eq!(who["gid"], p.bob.gid);
    assert_eq!(who["user"], "khtest-bob");
    let groups: Vec<&str> =
        who["groups"].as_array().unwrap().iter().filter_map(|g| g["name"].as_str()).collect();
    assert!(groups.contains(&"khtest-bob") && groups.contains(&"khtest-billing"), "{out}");
    assert!(who["pid"].as_i64().unwrap() > 0);
    assert!(who["exe"].as_str().unwrap().ends_with("/keyhaven"), "{out}");
    // The CLI runs in this process's control group (children inherit it).
    assert_eq!(who["cgroup"], own_cgroup().expect("/proc/self/cgroup"), "{out}");
    assert_eq!(
        who["grants"],
        serde_json::json!([{"rule": "billing apps", "operations": ["decrypt", "datakey"], "keys": ["*/pii"]}])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_replaces_a_good_policy_and_keeps_the_old_one_over_a_bad_one() {
    let p = people();
    let d = daemon_with_keys(&rules(&p)).await;
    let s = d.socket();
    denied(run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x"), "encrypt", "`beta/pii`");

    // A good policy, by `keyhaven admin reload`: alice now has beta/* too.
    let grant_beta = format!(
        "{}\n[[policy.rules]]\nprincipals = [\"uid:{}\"]\noperations = [\"encrypt\"]\nkeys = [\"beta/*\"]\n",
        rules(&p),
        p.alice.uid
    );
    d.write_policy(&grant_beta);
    let r: serde_json::Value = serde_json::from_str(&ok(run_cli(s, &["admin", "reload"], b""))).unwrap();
    assert_eq!(r["rules"], 5);
    ok(run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x"));

    // A bad one is refused with its line and reason; the old one stays.
    let bad = format!("{ROOT_ADMIN}\n[[policy.rules]]\nprincipals = [\"uid:1\"]\noperations = [\n  \"decrpyt\"]\nkeys = [\"*\"]\n");
    d.write_policy(&bad);
    let config = std::fs::read_to_string(d.dir().join("keyhaven.toml")).unwrap();
    let line = config.lines().position(|l| l.contains("decrpyt")).unwrap() + 1;
    let out = run_cli(s, &["admin", "reload"], b"");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("(invalid_config)"), "{t}");
    assert!(t.contains(&format!("line {line}: unknown operation `decrpyt`")), "line {line}: {t}");
    assert!(t.contains("unchanged"), "{t}");
    ok(run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x"));

    // Broken TOML, by SIGHUP: refused too, the old policy stays.
    std::fs::write(d.dir().join("keyhaven.toml"), config.replace("[[policy.rules]]", "[[policy.rules"))
        .unwrap();
    signal(d.pid(), "HUP");
    std::thread::sleep(std::time::Duration::from_millis(500));
    ok(run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x"));

    // A good one by SIGHUP: back to the first policy, beta is closed again.
    std::fs::write(d.dir().join("keyhaven.toml"), &config).unwrap();
    d.write_policy(&rules(&p));
    signal(d.pid(), "HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = run_cli_as(&p.alice, s, &["encrypt", "beta/pii"], b"x");
        if !out.status.success() {
            denied(out, "encrypt", "`beta/pii`");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SIGHUP did not reload the policy");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ok(run_cli_as(&p.alice, s, &["encrypt", "acme/pii"], b"x"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_does_not_start_with_a_policy_that_does_not_parse() {
    let mut d = TestDaemon::start();
    d.write_policy("[[policy.rules]]\nprincipals = [\"wheel\"]\noperations = [\"*\"]\nkeys = [\"*\"]\n");
    let (status, _) = d.stop();
    assert!(status.success());
    let out = d.run_once();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("[policy] line") && err.contains("principal `wheel`"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_mode_and_group_decide_who_may_connect() {
    use std::os::unix::fs::MetadataExt;
    let p = people();
    let mut d = TestDaemon::start();
    d.write_policy(&rules(&p));
    let file = d.dir().join("keyhaven.toml");
    let config = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        config.replace("socket_mode = 0o666", "socket_mode = 0o660\nsocket_group = \"khtest-alice\""),
    )
    .unwrap();
    d.restart();
    let meta = std::fs::metadata(d.socket()).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, p.alice.gid));
    // alice's primary group is the socket's group: she connects (and the policy decides).
    ok(run_cli_as(&p.alice, d.socket(), &["whoami"], b""));
    // dave is in neither the owner nor the group: the kernel refuses the connection.
    let t = text(&run_cli_as(&p.dave, d.socket(), &["whoami"], b""));
    assert!(t.contains("daemon not reachable") && t.contains("ermission denied"), "{t}");
}

/// Runs `gpasswd ARGS` until it succeeds (other tests may hold the lock on
/// /etc/group for a moment).
fn gpasswd(args: &[&str]) {
    for _ in 0..200 {
        let out = std::process::Command::new("gpasswd").args(args).output().expect("gpasswd");
        if out.status.success() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("gpasswd {args:?} did not succeed");
}

/// The daemon reuses a uid's groups for 10 s (POLICY.md §1); a policy
/// reload forgets them, so a user added to a group is granted what the
/// group is granted from the next connection after the reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_change_applies_from_the_next_connection_after_a_reload() {
    let erin = ensure_user("khtest-erin", &["khtest-late"]);
    gpasswd(&["-d", "khtest-erin", "khtest-late"]); // from an earlier run, or from ensure_user
    let policy = format!(
        "{ROOT_ADMIN}\n[[policy.rules]]\nprincipals = [\"group:khtest-late\"]\noperations = [\"encrypt\"]\nkeys = [\"acme/*\"]\n"
    );
    let d = daemon_with_keys(&policy).await;
    let s = d.socket();
    // Not in the group: denied (and the daemon now holds erin's groups).
    denied(run_cli_as(&erin, s, &["encrypt", "acme/pii"], b"x"), "encrypt", "`acme/pii`");
    gpasswd(&["-a", "khtest-erin", "khtest-late"]);
    ok(run_cli(s, &["admin", "reload"], b""));
    ok(run_cli_as(&erin, s, &["encrypt", "acme/pii"], b"x"));
    let who: serde_json::Value = serde_json::from_str(&ok(run_cli_as(&erin, s, &["whoami"], b""))).unwrap();
    let groups: Vec<&str> =
        who["groups"].as_array().unwrap().iter().filter_map(|g| g["name"].as_str()).collect();
    assert!(groups.contains(&"khtest-late"), "{who}");
    gpasswd(&["-d", "khtest-erin", "khtest-late"]);
}

/// The path the daemon records as a process's control group: the unified
/// hierarchy's (`0::/…`), else systemd's v1 one.
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = |l: &str| l.splitn(3, ':').nth(2).map(str::to_owned);
    let found = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .and_then(path)
        .or_else(|| text.lines().find(|l| l.split(':').nth(1) == Some("name=systemd")).and_then(path));
    found.filter(|p| !p.is_empty())
}

/// Set in the environment of the borrowing process that
/// [`a_connected_socket_passed_with_scm_rights_lends_its_identity`] starts.
const BORROWER: &str = "KEYHAVEN_TEST_BORROWER";

/// Issue 13 §7, POLICY.md §1.1: identity travels with the socket. A
/// granted process (this test, as root) connects, then passes the
/// connected socket with SCM_RIGHTS to a process running as dave, whom
/// the policy grants nothing. Over the borrowed socket dave is served as
/// root: `whoami` shows root's uid, pid and control group, and an encrypt
/// that dave's own connection is refused succeeds; the audit names root
/// and this process's pid, and the control group read at connect time.
/// This documents SO_PEERCRED's nature; it is not a defence.
#[tokio::test(flavor = "multi_thread")]
async fn a_connected_socket_passed_with_scm_rights_lends_its_identity() {
    use std::io::IoSlice;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

    let p = people();
    let policy = format!(
        "{ROOT_ADMIN}\n[[policy.rules]]\nname = \"root encrypts\"\nprincipals = [\"uid:0\"]\n\
         operations = [\"encrypt\"]\nkeys = [\"acme/*\"]\n"
    );
    let d = daemon_with_keys(&policy).await;
    let s = d.socket();
    assert_eq!(my_uid(), 0, "the suite runs as root");
    // dave's own connection: refused.
    denied(run_cli_as(&p.dave, s, &["encrypt", "acme/pii"], b"x"), "encrypt", "`acme/pii`");

    // Connect as root, then hand the connected socket to a process running
    // as dave (this test binary again, running only the borrower below),
    // over a socket pair that is its stdin.
    let conn = std::os::unix::net::UnixStream::connect(s).unwrap();
    let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fd_passing_borrower", "--ignored", "--nocapture", "--test-threads=1"])
        .env(BORROWER, "1")
        .uid(p.dave.uid)
        .gid(p.dave.gid)
        .current_dir("/")
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fds = [conn.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
    rustix::net::sendmsg(&mine, &[IoSlice::new(b"f")], &mut control, SendFlags::empty()).unwrap();
    drop(conn); // dave's process now holds the only copy
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "the borrower failed: {said}");
    let line =
        said.lines().find_map(|l| Some(l.split_once("BORROWER ")?.1)).unwrap_or_else(|| panic!("{said}"));
    let got: serde_json::Value = serde_json::from_str(line).unwrap();

    // It really is dave's process, in another pid …
    assert_eq!(got["uid"], p.dave.uid, "{got}");
    let me = std::process::id();
    assert_ne!(got["pid"], me, "{got}");
    // … served as root, with this process's pid and control group.
    let who = &got["whoami"];
    assert_eq!(
        (&who["uid"], &who["user"], &who["pid"]),
        (&serde_json::json!(0), &serde_json::json!("root"), &serde_json::json!(me)),
        "{got}"
    );
    let cgroup = own_cgroup().expect("the kernel offers /proc/self/cgroup");
    assert_eq!(who["cgroup"], cgroup, "{got}");
    assert_eq!(got["encrypt"], "ok", "{got}");

    // The audit names root and this pid for the encrypt dave's process made.
    let tail = ok(run_cli(s, &["audit", "tail", "--json"], b""));
    let records: Vec<serde_json::Value> = tail.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let encrypts: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["op"] == "encrypt" && r["outcome"] == "ok").collect();
    assert_eq!(encrypts.len(), 1, "{tail}");
    let caller = &encrypts[0]["caller"];
    assert_eq!((&caller["uid"], &caller["pid"]), (&serde_json::json!(0), &serde_json::json!(me)), "{tail}");
    assert_eq!(caller["cgroup"], cgroup, "{tail}");
    let refused: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["op"] == "encrypt" && r["outcome"] == "denied").collect();
    assert_eq!(refused.len(), 1, "{tail}");
    assert_eq!(refused[0]["caller"]["uid"], p.dave.uid, "dave's own connection is dave: {tail}");
}

/// The borrowing process of
/// [`a_connected_socket_passed_with_scm_rights_lends_its_identity`]: run
/// only by that test (as another user, with [`BORROWER`] set and a socket
/// pair as stdin). Receives a connected socket with SCM_RIGHTS, asks
/// `whoami` and encrypts over it, and prints what happened as one
/// `BORROWER {json}` line.
#[test]
#[ignore = "started by a_connected_socket_passed_with_scm_rights_lends_its_identity"]
fn fd_passing_borrower() {
    use std::io::IoSliceMut;
    use std::mem::MaybeUninit;

    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

    if std::env::var_os(BORROWER).is_none() {
        return;
    }
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let stdin = std::io::stdin();
    rustix::net::recvmsg(&stdin, &mut [IoSliceMut::new(&mut byte)], &mut control, RecvFlags::empty())
        .expect("recvmsg");
    let fd = control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .expect("a socket passed with SCM_RIGHTS");
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async move {
        let c = Client::from_stream(tokio::net::UnixStream::from_std(stream).unwrap());
        let who = c.call(&keyhaven::wire::Whoami {}).await.expect("whoami");
        let encrypt = match c.encrypt(&path("acme/pii"), b"borrowed", &ctx(&[])).await {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        serde_json::json!({
            "uid": my_uid(),
            "pid": std::process::id(),
            "whoami": who,
            "encrypt": encrypt,
        })
    });
    println!("BORROWER {report}");
}

/// `health` is free, but a failing audit sink's error text names paths of
/// the daemon's config: only a caller granted `admin` on `*` sees it;
/// callers named by no rule, or granted other things, see the sink's state
/// (PROTOCOL.md §3.2).
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_audit_sinks_error_text_is_shown_only_to_admins() {
    let p = people();
    let mut d = TestDaemon::start();
    let gone = d.dir().join("siem-gone.sock");
    d.write_policy(&format!(
        "{}\n[[audit.sink]]\nname = \"siem\"\ntype = \"syslog\"\npath = \"{}\"\n",
        rules(&p),
        gone.display()
    ));
    d.restart();
    let s = d.socket();
    let health_of = |out: Output| -> serde_json::Value { serde_json::from_str(&ok(out)).unwrap() };
    // Root is granted `admin` on `*` (ROOT_ADMIN): the state and why.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut n = 0;
    let admin = loop {
        n += 1;
        // A request, so that the sink has a record to deliver.
        ok(run_cli(s, &["key", "create", &format!("acme/traffic-{n}")], b""));
        let h = health_of(run_cli(s, &["health"], b""));
        if h["audit_sinks"][0]["state"] == "failing" {
            break h;
        }
        assert!(std::time::Instant::now() < deadline, "the sink did not fail: {h}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let error = admin["audit_sinks"][0]["error"].as_str().unwrap_or_else(|| panic!("{admin}"));
    assert!(error.contains("siem-gone.sock"), "the admin sees the error naming the socket: {admin}");
    // dave (no rule), alice (encrypt and decrypt on acme/*) and carol
    // (audit-read on acme/*): the sink and its state, not the error.
    for (who, user) in [("dave", &p.dave), ("alice", &p.alice), ("carol", &p.carol)] {
        let out = run_cli_as(user, s, &["health"], b"");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let h = health_of(out);
        let sink = &h["audit_sinks"][0];
        assert_eq!((&sink["name"], &sink["state"]), (&"siem".into(), &"failing".into()), "{who}: {h}");
        assert!(sink.get("error").is_none(), "{who} sees the sink's error: {h}");
        assert!(!h.to_string().contains("siem-gone") && !stderr.contains("siem-gone"), "{who}: {h} {stderr}");
        assert!(stderr.contains("audit sink `siem` (syslog) is failing"), "{who}: {stderr}");
    }
}
