//! README.md's quick start and CLI tour run as written: the command lines of
//! every ```console and ```sh block between `<!-- readme-test: begin -->`
//! and `<!-- readme-test: end -->` are read from README.md itself (never a
//! copy), in a fresh temporary folder, as a user would type them:
//!
//! - `$ target/debug/keyhavend dev` starts the dev daemon there (a
//!   `target` link in the folder reaches this build); its stdout line
//!   `export KEYHAVEN_SOCKET=…` must be the README's, with the folder for
//!   `/path/to/keyhaven`;
//! - that line is then "pasted" into a second shell, which runs every other
//!   command line, in README order, in one `sh` (so variables, files and the
//!   daemon's state carry from one block to the next), with `keyhaven` on
//!   PATH and stderr merged into stdout, as a terminal shows them.
//!
//! A ```console command's output must be what the README shows after it,
//! with ids, times, ciphertexts, tags and keys (which differ on every run)
//! matched by their form, and `…` matching anything. A command that shows no
//! output must print nothing, unless a `# comment` on its line says what it
//! prints. A command whose shown output ends in the CLI's error form
//! (`keyhaven: … (code)`) must exit 1; every other command must exit 0.
//! ```sh blocks show no output: each line must exit 0.
//!
//! Markers on the line before a block: `<!-- readme-test: skip: REASON -->`
//! (not run: benchmarks, package installs), `<!-- readme-test: given FILE… -->`
//! (the test makes each FILE, random bytes, as the user's own input).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyhaven_tests::{bin, signal};

const README: &str = include_str!("../../README.md");

#[derive(Debug)]
struct Block {
    line: usize,
    lang: String,
    lines: Vec<(usize, String)>,
    marker: Option<String>,
}

/// The fenced blocks between the begin and end markers.
fn blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let begin = lines
        .iter()
        .position(|l| l.starts_with("<!-- readme-test: begin"))
        .expect("README.md has no <!-- readme-test: begin --> marker");
    let end = lines
        .iter()
        .position(|l| l.starts_with("<!-- readme-test: end"))
        .expect("README.md has no <!-- readme-test: end --> marker");
    assert!(begin < end);
    let mut out = Vec::new();
    let mut i = begin;
    while i < end {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < lines.len() && lines[j] != "```" {
            j += 1;
        }
        assert!(j < end, "README.md:{}: a code block that does not close before the end marker", i + 1);
        let mut k = i;
        while k > 0 && lines[k - 1].trim().is_empty() {
            k -= 1;
        }
        let marker = lines[k - 1]
            .trim()
            .strip_prefix("<!-- readme-test: ")
            .and_then(|m| m.strip_suffix(" -->"))
            .filter(|m| !m.starts_with("begin"))
            .map(str::to_owned);
        let body = (i + 1..j).map(|n| (n + 1, lines[n].to_owned())).collect();
        out.push(Block { line: i + 1, lang: lang.trim().to_owned(), lines: body, marker });
        i = j + 1;
    }
    out
}

#[derive(Debug)]
struct Cmd {
    /// README line of the command.
    line: usize,
    text: String,
    /// The output shown after it (console blocks), else None.
    expected: Option<Vec<String>>,
}

/// A block's command lines: `$ ` lines (and their `\` continuations) in a
/// console block, with the lines after each as its output; every line of an
/// sh block.
fn commands(b: &Block) -> Vec<Cmd> {
    let mut out: Vec<Cmd> = Vec::new();
    let mut continued = false;
    for (n, l) in &b.lines {
        if continued {
            let c = out.last_mut().expect("a command");
            c.text.push('\n');
            c.text.push_str(l);
            continued = l.ends_with('\\');
            continue;
        }
        let cmd = match b.lang.as_str() {
            "console" => l.strip_prefix("$ "),
            "sh" => Some(l.as_str()).filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')),
            other => panic!("README.md:{}: a ```{other} block between the markers: mark it", b.line),
        };
        match cmd {
            Some(text) => {
                let expected = (b.lang == "console").then(Vec::new);
                out.push(Cmd { line: *n, text: text.to_owned(), expected });
                continued = text.ends_with('\\');
            }
            None => {
                let c = out.last_mut().unwrap_or_else(|| panic!("README.md:{n}: output before any command"));
                c.expected.as_mut().expect("console output").push(l.clone());
            }
        }
    }
    out
}

/// Replaces what differs from run to run by its form: `khc1:…`-style
/// values, 32-hex-digit ids, UTC times, and the numbers of time and uid
/// fields and the base64 of `plaintext` in JSON.
fn normalise(line: &str) -> String {
    let trimmed = line.trim_start();
    for field in ["\"plaintext\": \""] {
        if trimmed.starts_with(field) {
            return format!("{}{field}<base64>\"", &line[..line.len() - trimmed.len()]);
        }
    }
    let mut line = line.to_owned();
    if let Some(rest) = trimmed.strip_prefix('"') {
        if let Some((name, value)) = rest.split_once("\": ") {
            let digits = value.trim_end_matches(',');
            if (name.ends_with("_at") || name == "since" || name == "by_uid")
                && !digits.is_empty()
                && digits.bytes().all(|c| c.is_ascii_digit())
            {
                line = line.replacen(digits, "<n>", 1);
            }
        }
    }
    let b = line.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    while i < b.len() {
        let rest = &line[i..];
        if ["khc1:", "khe1:", "khm1:", "khs1:", "khp1:"].iter().any(|p| rest.starts_with(p)) {
            out.push_str(&rest[..5]);
            out.push_str("<value>");
            i += 5;
            while i < b.len() && word(b[i]) {
                i += 1;
            }
            continue;
        }
        let at_word_start = i == 0 || !word(b[i - 1]);
        let hex = rest.bytes().take_while(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()).count();
        if at_word_start && hex == 32 && !rest.as_bytes().get(32).is_some_and(|&c| word(c)) {
            out.push_str("<id>");
            i += 32;
            continue;
        }
        let shape = "dddd-dd-ddTdd:dd:ddZ";
        if rest.len() >= shape.len()
            && shape
                .bytes()
                .zip(rest.bytes())
                .all(|(s, c)| if s == b'd' { c.is_ascii_digit() } else { s == c })
        {
            out.push_str("<utc>");
            i += shape.len();
            continue;
        }
        let c = rest.chars().next().expect("a char");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// `actual` matches `expected`, where `…` in `expected` matches any text.
fn matches(expected: &str, actual: &str) -> bool {
    let parts: Vec<&str> = expected.split('…').collect();
    if parts.len() == 1 {
        return expected == actual;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || !actual[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &actual[first.len()..actual.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(at) => rest = &rest[at + p.len()..],
            None => return false,
        }
    }
    true
}

/// The CLI's error form ends the shown output: `keyhaven: … (code)`.
fn shows_failure(expected: &[String]) -> bool {
    let Some(last) = expected.last() else { return false };
    let Some(msg) = last.strip_prefix("keyhaven: ") else { return false };
    let head = msg.split(';').next().unwrap_or(msg);
    head.strip_suffix(')').and_then(|h| h.rsplit_once('(')).is_some_and(|(_, code)| {
        !code.is_empty() && code.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
    })
}

/// Stops the dev daemon (and its `sh`) however the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            signal(self.0.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn readme_quick_start_and_cli_tour_run_as_written() {
    let all = blocks(README);
    // The tour's own tools, as a reader of it needs them.
    for tool in ["jq", "openssl", "base64", "tee"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().expect("sh");
        assert!(found.status.success(), "the README's CLI tour uses `{tool}`, which is not installed");
    }
    let dir = tempfile::Builder::new().prefix("keyhaven-readme-").tempdir().expect("temp dir");
    let home = dir.path();
    // `target/debug/keyhavend` from the folder reaches this build.
    let target = bin("keyhavend").parent().and_then(Path::parent).expect("target dir").to_owned();
    std::os::unix::fs::symlink(&target, home.join("target")).expect("link target");
    let debug: PathBuf = target.join("debug");
    let path = format!("{}:{}", debug.display(), std::env::var("PATH").unwrap_or_default());

    let mut script = String::from("exec 2>&1\n");
    let mut checked: Vec<Cmd> = Vec::new();
    let mut daemon: Option<(Daemon, Cmd)> = None;
    let mut skipped = 0;
    let mut given: Vec<String> = Vec::new();
    for b in &all {
        match b.marker.as_deref() {
            Some(m) if m.starts_with("skip: ") => {
                skipped += 1;
                continue;
            }
            Some(m) if m.starts_with("given ") => {
                // 48 KiB: under `encrypt`'s 64 KiB, and varied bytes.
                for f in m["given ".len()..].split_whitespace() {
                    let bytes: Vec<u8> =
                        (0..48 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
                    std::fs::write(home.join(f), bytes).expect("write a given file");
                    given.push(f.to_owned());
                }
            }
            Some(m) => panic!("README.md:{}: unknown marker `{m}`", b.line),
            None => {}
        }
        for c in commands(b) {
            if c.text.starts_with("target/debug/keyhavend dev") {
                assert!(daemon.is_none(), "README.md:{}: a second dev daemon", c.line);
                let child = Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {}", c.text))
                    .current_dir(home)
                    .env_remove("KEYHAVEN_SOCKET")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start the dev daemon");
                daemon = Some((Daemon(child), c));
                continue;
            }
            script.push_str(&c.text);
            script.push_str("\nprintf '\\n\\036%s\\n' \"$?\"\n");
            checked.push(c);
        }
    }
    assert!(checked.len() > 60, "only {} command lines found between the markers", checked.len());
    assert!(skipped <= 6, "{skipped} blocks skipped: the README's examples should run");

    // The daemon's ready line, as the README shows it.
    let (mut d, start) = daemon.expect("the README starts `target/debug/keyhavend dev`");
    let stdout = d.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready =
        rx.recv_timeout(Duration::from_secs(60)).expect("the dev daemon did not print its line in 60 s");
    let shown = start.expected.as_ref().and_then(|e| e.first()).expect("the README shows the daemon's line");
    let want = shown.replace("/path/to/keyhaven", &home.display().to_string());
    assert_eq!(ready.trim_end(), want, "README.md:{}", start.line);

    // A second shell: paste the line, then every command.
    let started = Instant::now();
    let mut sh = Command::new("sh")
        .arg("-c")
        .arg(format!("{}\n{script}", ready.trim_end()))
        .current_dir(home)
        .env("PATH", &path)
        .env_remove("KEYHAVEN_SOCKET")
        .env_remove("KEYHAVEN_TIMEOUT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut out = sh.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = out.read_to_end(&mut all);
        all
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while sh.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = sh.kill();
            panic!("the README's commands did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = String::from_utf8_lossy(&reader.join().expect("reader")).into_owned();
    eprintln!("{} command lines ran in {:?}", checked.len(), started.elapsed());

    // Each command's output and status, in order.
    let mut rest = output.as_str();
    let mut failures = Vec::new();
    for c in &checked {
        let Some((got, after)) = rest.split_once("\n\u{1e}") else {
            failures.push(format!("README.md:{}: `{}` did not finish (the shell stopped)", c.line, c.text));
            break;
        };
        let (status, after) = after.split_once('\n').expect("status line");
        rest = after;
        let status: i32 = status.parse().expect("status");
        let got: Vec<String> = if got.is_empty() { Vec::new() } else { got.lines().map(normalise).collect() };
        let Some(expected) = &c.expected else {
            if status != 0 {
                failures.push(format!(
                    "README.md:{}: `{}` exited {status}:\n{}",
                    c.line,
                    c.text,
                    got.join("\n")
                ));
            }
            continue;
        };
        let want_status = if shows_failure(expected) { 1 } else { 0 };
        if status != want_status {
            failures.push(format!(
                "README.md:{}: `{}` exited {status}, not {want_status}:\n{}",
                c.line,
                c.text,
                got.join("\n")
            ));
            continue;
        }
        let commented = c.text.contains(" # ") || c.text.contains("  #");
        if expected.is_empty() && commented {
            continue;
        }
        let want: Vec<String> = expected.iter().map(|l| normalise(l)).collect();
        let ok = want.len() == got.len() && want.iter().zip(&got).all(|(w, g)| matches(w, g));
        if !ok {
            failures.push(format!(
                "README.md:{}: `{}` printed\n{}\nbut the README shows (after normalising)\n{}",
                c.line,
                c.text,
                got.join("\n"),
                want.join("\n")
            ));
        }
    }
    drop(d);
    // What the tour seals and opens again comes back whole.
    if given.iter().any(|f| f == "backup.tar") {
        let restored = std::fs::read(home.join("restored.tar")).unwrap_or_default();
        if restored != std::fs::read(home.join("backup.tar")).expect("backup.tar") {
            failures.push("restored.tar is not backup.tar".to_owned());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} commands differ from the README:\n\n{}",
        failures.len(),
        checked.len(),
        failures.join("\n\n")
    );
}

#[test]
fn normalising_keeps_what_the_readme_promises() {
    assert_eq!(normalise("  \"created_at\": 1795455189,"), "  \"created_at\": <n>,");
    assert_eq!(normalise("  \"current_version\": 1,"), "  \"current_version\": 1,");
    assert_eq!(normalise("khc1:S0gB-_x9 since 2026-11-23T17:44:20Z"), "khc1:<value> since <utc>");
    assert_eq!(
        normalise("\"envelope_id\": \"78da822e4a57808307fabdb3cde16af1\""),
        "\"envelope_id\": \"<id>\""
    );
    assert!(matches("eyJhbGci.eyJ…", "eyJhbGci.eyJzdWIi.sig"));
    assert!(!matches("eyJhbGci.eyJ…", "eyJhbGcX.eyJzdWIi.sig"));
    assert!(shows_failure(&["keyhaven: the envelope does not authenticate (integrity)".into()]));
    assert!(shows_failure(&["keyhaven: x (integrity); the output written so far is not valid".into()]));
    assert!(!shows_failure(&["keyhaven: the tag matches (key `acme/email-index` version 1)".into()]));
}

/// Every ```rust block of README.md is a program in client/examples (its
/// text after the file's `//!` header), and those programs, as built, run
/// against a dev daemon.
#[test]
fn readme_rust_programs_are_the_examples_and_run() {
    let lines: Vec<&str> = README.lines().collect();
    let mut shown = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i] == "```rust" {
            let j = i + 1 + lines[i + 1..].iter().position(|l| *l == "```").expect("block closes");
            shown.push((i + 1, lines[i + 1..j].join("\n")));
            i = j;
        }
        i += 1;
    }
    assert_eq!(shown.len(), 2, "README.md's Rust programs");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../client/examples");
    let mut names = Vec::new();
    for (line, text) in &shown {
        let found = std::fs::read_dir(&examples).expect("client/examples").find_map(|e| {
            let path = e.expect("entry").path();
            let file = std::fs::read_to_string(&path).expect("read example");
            let body: Vec<&str> =
                file.lines().skip_while(|l| l.starts_with("//!")).skip_while(|l| l.is_empty()).collect();
            (body.join("\n") == *text).then(|| path.file_stem().expect("stem").to_string_lossy().into_owned())
        });
        let name = found.unwrap_or_else(|| {
            panic!("README.md:{line}: this Rust program is not the text of any file in client/examples")
        });
        names.push(name);
    }
    assert_eq!(names, ["quickstart", "seal_records"]);

    let d = keyhaven_tests::TestDaemon::start();
    let built = bin("keyhavend").parent().expect("target/debug").join("examples");
    for (name, says) in [
        ("quickstart", "created acme/pii at version 1"),
        ("seal_records", "sealed and opened 27 bytes as khs1:"),
    ] {
        let exe = built.join(name);
        assert!(
            exe.exists(),
            "{} is missing: build with `cargo test --workspace` (it builds the examples)",
            exe.display()
        );
        let out = Command::new(&exe).env("KEYHAVEN_SOCKET", d.socket()).output().expect("run example");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(says), "{name} printed {stdout}");
    }
}
