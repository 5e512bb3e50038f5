//! Production mode: the start-up checks that refuse an install that is easy
//! to attack (a software token, a weak or exposed PIN, a socket, store or
//! config that others may read or change), and the process hygiene applied
//! before any secret is read (no core dumps, memory locked where the limit
//! allows). Dev mode skips the checks; the hygiene applies to every mode.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, Mode};

/// Shortest PIN production mode accepts.
pub const MIN_PIN_LEN: usize = 8;

/// Least estimated strength, in bits, of a PIN production mode accepts
/// (see [`pin_strength_bits`] and docs/OPERATIONS.md §1.7).
pub const MIN_PIN_BITS: u32 = 40;

/// Characters of a PIN the estimate looks at (the search for repeated
/// stretches is cubic in the length); a longer PIN is judged by these.
const MAX_JUDGED: usize = 256;

/// PINs that are published as defaults or examples (SoftHSM2's and OpenSC's
/// documentation and test scripts, smart-card and HSM vendors' factory
/// defaults, our own docs), compared without regard to case. Short ones
/// (`1234`, `0000`, `123456`…) are refused by the length rule already and
/// are listed for clarity.
const KNOWN_PINS: &[&str] = &[
    "0000",
    "1111",
    "1234",
    "12345",
    "123456",
    "1234567",
    "12345678",
    "123456789",
    "1234567890",
    "0123456789",
    "87654321",
    "648219",                                           // OpenSC: SmartCard-HSM user PIN
    "3537363231383830",                                 // OpenSC: SmartCard-HSM SO PIN
    "010203040506070801020304050607080102030405060708", // PIV management key
    "fedcba9876543210",
    "changeme",
    "change-me",
    "changeit",
    "password",
    "passw0rd",
    "password1",
    "secret",
    "default",
    "userpin",
    "user-pin",
    "sopin",
    "so-pin",
    "keyhaven",
    "softhsm",
    "softhsm2",
    "qwertyui",
    "qwerty123",
    "abcdefgh",
    "abcd1234",
    "test1234",
    "admin123",
];

/// Common passwords, keyboard patterns and words an operator reaches for
/// (from the most-used-password lists, plus our own names). Compared in
/// lower case with the usual digit-for-letter swaps undone ([`unleet`]):
/// as the whole PIN, as the PIN without leading and trailing digits and
/// symbols (`Password2024!`), and, for those of 4 characters or more, as
/// a part of it.
const COMMON_WORDS: &[&str] = &[
    "password",
    "passwort",
    "passphrase",
    "pass",
    "qwerty",
    "qwertz",
    "azerty",
    "qwertyuiop",
    "asdfgh",
    "asdfghjkl",
    "zxcvbn",
    "zxcvbnm",
    "1qaz2wsx",
    "zaq12wsx",
    "1q2w3e4r",
    "q1w2e3r4",
    "abc123",
    "letmein",
    "welcome",
    "admin",
    "administrator",
    "root",
    "toor",
    "login",
    "master",
    "secret",
    "dragon",
    "monkey",
    "football",
    "baseball",
    "soccer",
    "hockey",
    "iloveyou",
    "love",
    "princess",
    "sunshine",
    "shadow",
    "superman",
    "batman",
    "trustno1",
    "starwars",
    "whatever",
    "freedom",
    "computer",
    "internet",
    "hello",
    "test",
    "testing",
    "guest",
    "user",
    "default",
    "changeme",
    "changeit",
    "keyhaven",
    "softhsm",
    "token",
    "pkcs11",
    "security",
    "summer",
    "winter",
    "spring",
    "autumn",
    "access",
    "private",
    "system",
    "service",
    "server",
    "oracle",
    "ubuntu",
    "debian",
    "linux",
    "temp",
    "temporary",
    "hunter",
    "michael",
    "jennifer",
    "charlie",
    "pepper",
    "cookie",
    "cheese",
    "flower",
    "matrix",
    "ninja",
    "mustang",
    "backup",
    "production",
    "company",
    "pin",
    "userpin",
    "sopin",
];

/// Keyboard rows (US layout, unshifted, and the shifted digit row): three
/// or more neighbours along one row in one direction are a walk.
const KEYBOARD_ROWS: &[&str] =
    &["`1234567890-=", "~!@#$%^&*()_+", "qwertyuiop[]\\", "asdfghjkl;'", "zxcvbnm,./"];

/// Lower case, with the usual swaps of digits and symbols for letters
/// undone (`p@ssw0rd` is `password`); `1`, `!`, `|` and `l` all become `i`.
fn unleet(c: char) -> char {
    match c.to_ascii_lowercase() {
        '0' => 'o',
        '1' | '!' | '|' | 'l' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' | '+' => 't',
        '8' => 'b',
        '9' => 'g',
        c => c,
    }
}

fn key_position(c: char) -> Option<(usize, i64)> {
    KEYBOARD_ROWS
        .iter()
        .enumerate()
        .find_map(|(row, keys)| keys.chars().position(|k| k == c).map(|col| (row, col as i64)))
}

/// What a run of predictable characters is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// `aaaa`
    Repeat,
    /// `abcd`, `4321` (code points one apart, one direction)
    Sequence,
    /// `qwer`, `;lkj` (neighbours on one keyboard row, one direction)
    Walk,
}

/// The longest run starting at `i` in `s` (lower case), with its kind; 1
/// when there is none.
fn longest_run(s: &[char], i: usize) -> (usize, Run) {
    let mut best = (1, Run::Repeat);
    if i + 1 >= s.len() {
        return best;
    }
    let extend = |step: &dyn Fn(usize) -> bool| {
        let mut k = i;
        while k + 1 < s.len() && step(k) {
            k += 1;
        }
        k + 1 - i
    };
    let repeat = extend(&|k| s[k + 1] == s[i]);
    if repeat > best.0 {
        best = (repeat, Run::Repeat);
    }
    let delta = |k: usize| s[k + 1] as i64 - s[k] as i64;
    let d = delta(i);
    if d.abs() == 1 {
        let n = extend(&|k| delta(k) == d);
        if n > best.0 {
            best = (n, Run::Sequence);
        }
    }
    let walk = |k: usize| match (key_position(s[k]), key_position(s[k + 1])) {
        (Some((r0, c0)), Some((r1, c1))) if r0 == r1 => Some(c1 - c0),
        _ => None,
    };
    if let Some(d) = walk(i).filter(|d| d.abs() == 1) {
        let n = extend(&|k| walk(k) == Some(d));
        if n > best.0 {
            best = (n, Run::Walk);
        }
    }
    best
}

/// The size of the alphabet the PIN draws from, by the classes it uses:
/// digits 10, lower-case letters 26, upper-case letters 26, anything else 33.
fn alphabet(chars: &[char]) -> u32 {
    let has = |f: fn(&char) -> bool| chars.iter().any(f);
    let mut size = 0;
    if has(char::is_ascii_digit) {
        size += 10;
    }
    if has(char::is_ascii_lowercase) {
        size += 26;
    }
    if has(char::is_ascii_uppercase) {
        size += 26;
    }
    if has(|c| !c.is_ascii_alphanumeric()) {
        size += 33;
    }
    size
}

/// Characters of `chars` that are not predictable from what comes before
/// them: every character counts once, except
/// - the 2nd and later characters of a run of 3 or more that repeats one
///   character, steps through consecutive characters, or walks along a
///   keyboard row (`aaa`, `abc`, `321`, `qwe`),
/// - the 2nd and later characters of a stretch of 3 or more that repeats an
///   earlier stretch (`Xk9Xk9`),
/// - the 2nd and later characters of a common word of 4 letters or more
///   ([`COMMON_WORDS`], leet swaps undone).
fn unpredictable_chars(chars: &[char]) -> usize {
    let lower: Vec<char> = chars.iter().map(char::to_ascii_lowercase).collect();
    let plain: Vec<char> = chars.iter().copied().map(unleet).collect();
    let n = lower.len();
    let mut counts = vec![true; n];
    let mut i = 0;
    while i < n {
        let (len, _) = longest_run(&lower, i);
        if len >= 3 {
            counts[i + 1..i + len].iter_mut().for_each(|c| *c = false);
            i += len - 1;
        } else {
            i += 1;
        }
    }
    let mut i = 1;
    while i < n {
        let repeat = (0..i)
            .map(|j| (0..n - i).take_while(|l| lower[j + l] == lower[i + l]).count())
            .max()
            .unwrap_or(0);
        if repeat >= 3 {
            counts[i + 1..i + repeat].iter_mut().for_each(|c| *c = false);
            i += repeat;
        } else {
            i += 1;
        }
    }
    for word in COMMON_WORDS {
        let word: Vec<char> = word.chars().map(unleet).collect();
        if word.len() < 4 || word.len() > n {
            continue;
        }
        for at in 0..=n - word.len() {
            if plain[at..at + word.len()] == word[..] {
                counts[at + 1..at + word.len()].iter_mut().for_each(|c| *c = false);
            }
        }
    }
    counts.iter().filter(|c| **c).count()
}

/// The estimated strength of a PIN in bits: its unpredictable characters
/// (see [`unpredictable_chars`]) times log2 of the alphabet its character
/// classes span. A rough guessing estimate, not entropy: it is meant to
/// refuse what people pick by habit, and to pass what a generator makes.
pub fn pin_strength_bits(pin: &str) -> u32 {
    let chars: Vec<char> = pin.chars().take(MAX_JUDGED).collect();
    if chars.is_empty() {
        return 0;
    }
    (unpredictable_chars(&chars) as f64 * f64::from(alphabet(&chars)).log2()).floor() as u32
}

fn is_common(text: &str) -> bool {
    let plain: String = text.chars().map(unleet).collect();
    KNOWN_PINS.iter().any(|k| k.eq_ignore_ascii_case(text))
        || COMMON_WORDS.iter().any(|w| w.chars().map(unleet).eq(plain.chars()))
}

/// Why a PIN is weak, or `None`. Never returns or logs the PIN itself.
///
/// The rule (docs/OPERATIONS.md §1.7): a PIN is weak when it is empty; a
/// well-known default or common password ([`KNOWN_PINS`], [`COMMON_WORDS`],
/// case and leet swaps ignored); such a word with only digits and symbols
/// around it; shorter than [`MIN_PIN_LEN`] characters; or estimated below
/// [`MIN_PIN_BITS`] bits by [`pin_strength_bits`].
pub fn weak_pin(pin: &str) -> Option<String> {
    let chars: Vec<char> = pin.chars().take(MAX_JUDGED).collect();
    if chars.is_empty() {
        return Some("it is empty".into());
    }
    if is_common(pin) {
        return Some("it is a well-known default, example or common PIN".into());
    }
    let core = pin.trim_matches(|c: char| !c.is_alphabetic());
    if !core.is_empty() && core != pin && is_common(core) {
        return Some("it is a common password or word with digits or symbols added".into());
    }
    if chars.len() < MIN_PIN_LEN {
        return Some(format!("it is shorter than {MIN_PIN_LEN} characters"));
    }
    let lower: Vec<char> = chars.iter().map(char::to_ascii_lowercase).collect();
    let n = lower.len();
    if lower.iter().all(|c| *c == lower[0]) {
        return Some("it is one character repeated".into());
    }
    if (2..=n / 2).any(|b| n % b == 0 && (b..n).all(|k| lower[k] == lower[k % b])) {
        return Some("it is a short stretch of characters repeated".into());
    }
    match longest_run(&lower, 0) {
        (len, Run::Sequence) if len == n => return Some("it is a run of consecutive characters".into()),
        (len, Run::Walk) if len == n => return Some("it is a walk along a keyboard row".into()),
        _ => {}
    }
    let bits = pin_strength_bits(pin);
    if bits < MIN_PIN_BITS {
        return Some(format!(
            "it is too predictable: an estimated {bits} bits where {MIN_PIN_BITS} are needed (repeats, \
             sequences, keyboard walks and common words count for little)"
        ));
    }
    None
}

/// A path production mode checks, as the messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The configuration file (it holds the policy and `[hsm] module`).
    ConfigFile,
    /// The PKCS#11 module (the code the PIN is handed to).
    Module,
    /// The file the PIN is read from (`pin_file` or the systemd credential).
    PinFile,
    /// The directory of the socket.
    SocketDir,
    /// The store directory.
    StoreDir,
    /// The file the PostgreSQL connection string is read from (`[store]
    /// url_file` or its systemd credential): it holds the password.
    StoreUrlFile,
}

impl Checked {
    fn name(self) -> &'static str {
        match self {
            Checked::ConfigFile => "the config file",
            Checked::Module => "the PKCS#11 module",
            Checked::PinFile => "the PIN file",
            Checked::SocketDir => "the socket directory",
            Checked::StoreDir => "the store directory",
            Checked::StoreUrlFile => "the PostgreSQL connection string file",
        }
    }

    /// Mode bits it must not have, what is required in words, and the fix.
    fn rule(self) -> (u32, &'static str, &'static str) {
        match self {
            Checked::ConfigFile => (
                0o022,
                "must not be writable by its group or others (they would control the policy and the module)",
                "chmod go-w",
            ),
            Checked::Module => (
                0o022,
                "must not be writable by its group or others (they would run code inside the daemon, which holds \
                 the PIN)",
                "chmod go-w",
            ),
            Checked::PinFile | Checked::StoreUrlFile => (
                0o027,
                "must be readable by its owner only, or its owner and group (0400, or 0440 for a group the daemon \
                 is in)",
                "chmod 0400",
            ),
            Checked::SocketDir => (
                0o026,
                "must not be writable by its group, nor listable or writable by others (0750 with the clients' \
                 group, or 0711 with `socket_mode = 0o666`)",
                "chmod o-rw,g-w",
            ),
            Checked::StoreDir => (0o027, "must not be writable by its group, and closed to others (0700)", "chmod 0700"),
        }
    }
}

/// What is wrong with a directory (or symbolic link) on the way to a
/// checked path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AncestorIssue {
    /// It belongs to this uid, neither root nor the daemon's user.
    Owner(u32),
    /// Its group or others may write it (and it is not a sticky
    /// directory of root's).
    Writable(u32),
}

/// One reason production mode refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The module is SoftHSM2 and `allow_softhsm` is not set.
    #[error(
        "[hsm] module {} is SoftHSM2, a software token with no hardware boundary: point `module` at your \
         HSM's PKCS#11 module, or set `allow_softhsm = true` in [hsm] to accept it knowingly",
        module.display()
    )]
    SoftHsm {
        /// The module.
        module: PathBuf,
    },
    /// The PIN fails the strength rule.
    #[error(
        "the token's user PIN is weak ({why}): give the token a PIN of at least {MIN_PIN_LEN} characters that \
         is not a default or a common password and has no long repeats, sequences or keyboard walks (the rule \
         is in OPERATIONS.md §1.7; a random one of 16 letters and digits passes), with your HSM's tools, and \
         update {from}"
    )]
    WeakPin {
        /// Why, without the PIN.
        why: String,
        /// Where the PIN comes from.
        from: String,
    },
    /// The PIN cannot be found or read.
    #[error("{0}")]
    Pin(String),
    /// A checked path cannot be examined.
    #[error("cannot check {} {}: {error}", what.name(), path.display())]
    Unreadable {
        /// What it is.
        what: Checked,
        /// The path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A checked path belongs to someone other than root or the daemon's user.
    #[error(
        "{} {} belongs to uid {uid}{}: it must belong to root or to the daemon's user (uid {daemon}), or its \
         owner could change it; run `chown root {}` (or chown it to the daemon's user)",
        what.name(), path.display(), user_name(*uid), path.display()
    )]
    Owner {
        /// What it is.
        what: Checked,
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The daemon's effective uid.
        daemon: u32,
    },
    /// A checked path's mode lets others in.
    #[error("{} {} has mode {mode:04o}: it {}; run `{} {}`", what.name(), path.display(), what.rule().1, what.rule().2, path.display())]
    Mode {
        /// What it is.
        what: Checked,
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A directory on the way to one or more checked paths lets someone
    /// else replace what is below it.
    #[error("{}", ancestor_message(dir, *issue, above, *daemon))]
    Ancestor {
        /// The directory (or symbolic link).
        dir: PathBuf,
        /// What is wrong with it.
        issue: AncestorIssue,
        /// The checked paths below it (`the config file /etc/…`).
        above: Vec<String>,
        /// The daemon's effective uid.
        daemon: u32,
    },
}

fn ancestor_message(dir: &Path, issue: AncestorIssue, above: &[String], daemon: u32) -> String {
    let d = dir.display();
    let above = above.join(", ");
    match issue {
        AncestorIssue::Owner(uid) => format!(
            "{d}, on the way to {above}, belongs to uid {uid}{}: every directory up to / must belong to root \
             or to the daemon's user (uid {daemon}), or its owner could replace what is below it; run \
             `chown root {d}` or move the files",
            user_name(uid)
        ),
        AncestorIssue::Writable(mode) => format!(
            "{d}, on the way to {above}, has mode {mode:04o}: its group or others may write it, and so replace \
             what is below it; every directory up to / must be writable by its owner only, unless it is root's \
             and sticky like /tmp (mode 1777); run `chmod go-w {d}` or move the files"
        ),
    }
}

/// ` (name)` of a uid, when the user database knows it.
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| format!(" ({})", u.name))
        .unwrap_or_default()
}

/// Production mode's refusals: every problem found, each saying what to
/// change.
#[derive(Debug, thiserror::Error)]
#[error("production mode refuses to start (config {}):\n  - {}", config.display(), list(problems))]
pub struct Refused {
    /// The configuration file.
    pub config: PathBuf,
    /// What is wrong, and what to change.
    pub problems: Vec<Problem>,
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - ")
}

/// The ownership and mode checks of the paths that decide what the daemon
/// runs and who can reach its secrets. Each checked path must belong to
/// root or to the daemon's user and meet its mode rule ([`Checked`]); each
/// directory (and symbolic link) on the way to it, up to `/`, as written
/// and after resolving links, must belong to root or to the daemon's user
/// and be writable by its owner only, except a sticky directory of root's
/// (`/tmp`).
struct PathChecks {
    daemon: u32,
    problems: Vec<Problem>,
    ancestors: Vec<(PathBuf, Option<AncestorIssue>, Vec<String>)>,
}

impl PathChecks {
    fn new() -> PathChecks {
        PathChecks { daemon: nix::unistd::geteuid().as_raw(), problems: Vec::new(), ancestors: Vec::new() }
    }

    fn owner_ok(&self, uid: u32) -> bool {
        uid == 0 || uid == self.daemon
    }

    /// Checks `path` and its ancestors. A missing path is a problem only
    /// when `required` (else what uses it reports it); its existing
    /// ancestors are checked all the same. Returns whether a problem was
    /// found with the path itself.
    fn check(&mut self, what: Checked, path: &Path, required: bool) -> bool {
        let before = self.problems.len();
        match std::fs::metadata(path) {
            Ok(meta) => {
                if !self.owner_ok(meta.uid()) {
                    self.problems.push(Problem::Owner {
                        what,
                        path: path.to_owned(),
                        uid: meta.uid(),
                        daemon: self.daemon,
                    });
                }
                let mode = meta.permissions().mode() & 0o7777;
                if mode & what.rule().0 != 0 {
                    self.problems.push(Problem::Mode { what, path: path.to_owned(), mode });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(error) => self.problems.push(Problem::Unreadable { what, path: path.to_owned(), error }),
        }
        let label = format!("{} {}", what.name(), path.display());
        for dir in on_the_way(path) {
            self.ancestor(&dir, &label);
        }
        self.problems.len() > before
    }

    fn ancestor(&mut self, dir: &Path, label: &str) {
        if let Some((_, _, above)) = self.ancestors.iter_mut().find(|(d, _, _)| d == dir) {
            if !above.iter().any(|a| a == label) {
                above.push(label.to_owned());
            }
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(dir) else { return };
        let mode = meta.permissions().mode() & 0o7777;
        let issue = if !self.owner_ok(meta.uid()) {
            Some(AncestorIssue::Owner(meta.uid()))
        } else if meta.is_dir() && mode & 0o022 != 0 && !(mode & 0o1000 != 0 && meta.uid() == 0) {
            Some(AncestorIssue::Writable(mode))
        } else {
            None
        };
        self.ancestors.push((dir.to_owned(), issue, vec![label.to_owned()]));
    }

    fn finish(mut self) -> Vec<Problem> {
        let daemon = self.daemon;
        self.problems.extend(self.ancestors.into_iter().filter_map(|(dir, issue, above)| {
            issue.map(|issue| Problem::Ancestor { dir, issue, above, daemon })
        }));
        self.problems
    }
}

/// The directories on the way to `path`, up to `/`: as written (made
/// absolute; with `path` itself when it is a symbolic link), then those of
/// the path with every link resolved, without repeats.
fn on_the_way(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut add = |p: &Path| {
        if !p.as_os_str().is_empty() && !out.iter().any(|o| o == p) {
            out.push(p.to_owned());
        }
    };
    let written = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    if std::fs::symlink_metadata(&written).is_ok_and(|m| m.file_type().is_symlink()) {
        add(&written);
    }
    written.ancestors().skip(1).for_each(&mut add);
    match std::fs::canonicalize(&written) {
        Ok(real) => real.ancestors().skip(1).for_each(&mut add),
        Err(_) => {
            if let Some(Ok(dir)) = written.parent().map(std::fs::canonicalize) {
                dir.ancestors().for_each(&mut add);
            }
        }
    }
    out
}

/// Checks a production configuration before anything starts. Dev mode
/// passes without checks. Reads the PIN to judge it (and drops it).
pub fn check(config: &Config) -> Result<(), Refused> {
    if config.mode != Mode::Production {
        return Ok(());
    }
    let mut problems = Vec::new();
    let module_name =
        config.hsm.module.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if module_name.contains("softhsm") && !config.hsm.allow_softhsm {
        problems.push(Problem::SoftHsm { module: config.hsm.module.clone() });
    }
    let mut paths = PathChecks::new();
    if let Some(file) = &config.source {
        paths.check(Checked::ConfigFile, file, true);
    }
    paths.check(Checked::Module, &config.hsm.module, false);
    let mut pin_file_problem = false;
    match config.pin_path() {
        Ok(Some(file)) => pin_file_problem = paths.check(Checked::PinFile, &file, true),
        Ok(None) => {}
        Err(e) => {
            problems.push(Problem::Pin(e));
            pin_file_problem = true;
        }
    }
    match config.read_pin() {
        Ok(pin) => {
            if let Some(why) = weak_pin(pin.expose()) {
                problems.push(Problem::WeakPin { why, from: pin_source(config) });
            }
        }
        Err(e) if !pin_file_problem => problems.push(Problem::Pin(e)),
        Err(_) => {}
    }
    if let Some(dir) = config.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        paths.check(Checked::SocketDir, dir, false);
    }
    paths.check(Checked::StoreDir, &config.store.path, false);
    let url_file = match (&config.store.url_file, &config.store.url_credential) {
        (Some(f), _) => Some(f.clone()),
        (_, Some(name)) => std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| PathBuf::from(d).join(name)),
        _ => None,
    };
    if let Some(file) = url_file {
        paths.check(Checked::StoreUrlFile, &file, true);
    }
    problems.extend(paths.finish());
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refused { config: config.source.clone().unwrap_or_default(), problems })
    }
}

fn pin_source(config: &Config) -> String {
    match (&config.hsm.pin_file, &config.hsm.pin_env, &config.hsm.pin_credential) {
        (Some(f), _, _) => format!("the PIN file {}", f.display()),
        (_, Some(v), _) => format!("the variable `{v}`"),
        (_, _, Some(c)) => format!("the systemd credential `{c}`"),
        _ => "the PIN".into(),
    }
}

/// What [`process_hygiene`] did about memory locking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLock {
    /// All current and future pages are locked (`mlockall`).
    Locked,
    /// Not locked, and why.
    NotLocked(String),
    /// Not attempted (dev mode).
    Skipped,
}

/// Turns core dumps off (RLIMIT_CORE 0, PR_SET_DUMPABLE 0: no core file,
/// no ptrace or /proc/PID/mem by other processes of the same user) and, in
/// production mode, locks the process's memory so that PINs and data keys
/// are never written to swap.
///
/// Memory is locked with `mlockall(MCL_CURRENT | MCL_FUTURE)` only when
/// RLIMIT_MEMLOCK is unlimited (the unit sets `LimitMEMLOCK=infinity`):
/// under a finite limit, MCL_FUTURE would make allocations fail once the
/// daemon grows past it, which is worse than swap. Locking single buffers
/// would need raw pointers (`unsafe`, forbidden here) and would still miss
/// copies made by the PKCS#11 module and the allocator.
///
/// Fails only when core dumps cannot be turned off.
pub fn process_hygiene(mode: Mode) -> Result<MemoryLock, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| format!("cannot set RLIMIT_CORE to 0: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("cannot clear PR_SET_DUMPABLE: {e}"))?;
    if mode != Mode::Production {
        return Ok(MemoryLock::Skipped);
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| format!("getrlimit: {e}"))?;
    if soft != RLIM_INFINITY {
        return Ok(MemoryLock::NotLocked(format!(
            "RLIMIT_MEMLOCK is {soft} bytes, not unlimited; set `LimitMEMLOCK=infinity` in the unit \
             (or `ulimit -l unlimited`) to keep secrets out of swap"
        )));
    }
    use nix::sys::mman::{mlockall, MlockAllFlags};
    match mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
        Ok(()) => Ok(MemoryLock::Locked),
        Err(e) => Ok(MemoryLock::NotLocked(format!("mlockall failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_pins_are_named_without_the_pin() {
        for pin in [
            "",
            "1234",
            "0000",
            "123456",
            "changeme",
            "ChangeMe",
            "12345678",
            "87654321",
            "abcdefgh",
            "aaaaaaaaaaaa",
            "0000000000",
            "1212121212",
            "3537363231383830",
            "xk3q",
            // Issue 13 §6: accepted before this rule.
            "qwertyuiop",
            "password1234",
            "123123123",
            // Common words with decoration, leet, walks, repeats, sequences.
            "P@ssw0rd2024!",
            "Summer2024!",
            "iloveyou!!",
            "qwerty2024",
            "1qaz2wsx",
            "zaq12wsxcde",
            "asdfghjkl;",
            ";lkjhgfdsa",
            "9876543210",
            "abcabcabcabc",
            "Xk9Xk9Xk9Xk9",
            "aaaaBBBB1111",
            "keyhaven-prod",
            "trustno1trustno1",
        ] {
            let why = weak_pin(pin).unwrap_or_else(|| panic!("`{pin}` must be weak"));
            assert!(pin.is_empty() || !why.contains(pin), "{why}");
        }
        for pin in ["9f3c2a7e51d04b8c", "correct horse battery", "Zk4!pq9rT", "Gq7vRz2LwP9mXc4T"] {
            assert_eq!(weak_pin(pin), None, "{pin}: {} bits", pin_strength_bits(pin));
        }
    }

    /// What a generator makes passes: 16 characters drawn at random from
    /// letters and digits, many times over.
    #[test]
    fn random_sixteen_character_pins_pass() {
        use std::io::Read;
        const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut bytes = vec![0u8; 16 * 500];
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
        for chunk in bytes.chunks(16) {
            let pin: String = chunk.iter().map(|b| ALNUM[*b as usize % ALNUM.len()] as char).collect();
            assert_eq!(weak_pin(&pin), None, "{pin}: {} bits", pin_strength_bits(&pin));
        }
    }

    #[test]
    fn the_hsm_config_debug_never_shows_the_pin() {
        let cfg = crate::hsm::HsmConfig {
            module: "m.so".into(),
            token_label: "t".into(),
            pin: crate::secret::Pin::new("debug-Pin-9271"),
            master_key_label: "keyhaven-mk".into(),
            audit_key_label: "keyhaven-audit".into(),
            workers: crate::hsm::Workers::Fixed(1),
            inline: false,
            queue_depth: 1,
            loaded_keys: 1,
        };
        let dbg = format!("{cfg:?} {cfg:#?}");
        assert!(!dbg.contains("debug-Pin-9271") && dbg.contains("redacted"), "{dbg}");
    }
}
