//! Every command line in the docs that runs `keyhaven`, `keyhavend` or
//! `khseal` exists as written, and every subcommand is documented.
//!
//! The command lines are read from the files themselves (never a copy):
//! README.md, docs/*.md, clients/*/README.md, systemd/, packaging/,
//! tests/*/README.md, and the binaries' own `--help` texts. In Markdown:
//! fenced blocks (```sh, ```bash, ```console, plain ```; in ```console
//! only the `$ ` lines) and inline code spans; in
//! the units, `Exec…=` lines; in the shell scripts, every line; in comments,
//! code spans and lines indented as code (`#   keyhavend check …`). Each line
//! is split as a shell would (`\` continuations, quotes, pipes, `&&`, `;`,
//! `$(…)` and backquotes, redirections, comments, here-documents), and in
//! each simple command the env assignments, `sudo`, `runuser … --`,
//! `systemd-run …`, `env`, `nice`, `time`, `timeout D`, `xargs`, `ip netns
//! exec NAME` are stepped over to the command word. A command word whose
//! file name is one of the three binaries (any path prefix) is checked:
//!
//! - each word that names a subcommand of the current one (from its
//!   `--help`) descends into it; a word that is neither an option nor a
//!   subcommand is a positional value, which is not checked, but a command
//!   whose help lists no `Arguments:` takes none (so a misspelt subcommand
//!   is caught);
//! - every `--long` and `-s` option must be one that the current
//!   subcommand's `--help` lists, and one that takes a value (`<VALUE>` in
//!   the help) takes the next word unless written `--long=VALUE`.
//!
//! Placeholders (TENANT/KEY, `<…>`, N, `…`) are values, and `[…]` brackets
//! of a synopsis are read through. `khseal` (the cross-language test
//! helper, tests/src/bin/khseal.rs) has no `--help`: its two forms are
//! checked against its usage. Lines that are deliberately not runnable are
//! in [`ALLOWED`], each with its reason. Only `--help` runs, so this is fast.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use keyhaven_tests::bin;

/// Documented lines that are deliberately not runnable as written:
/// (file, the command as extracted (its words joined by spaces), why).
/// Each entry must still match a line (a stale entry fails the test).
const ALLOWED: &[(&str, &str, &str)] = &[];

/// The three binaries whose command lines are checked.
const BINARIES: &[&str] = &["keyhaven", "keyhavend", "khseal"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The files read, relative to the workspace root, sorted.
fn doc_files() -> Vec<String> {
    let root = root();
    let mut files = vec!["README.md".to_owned()];
    let add_dir = |dir: &str, keep: &dyn Fn(&str) -> bool, files: &mut Vec<String>| {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
                let path = entry.expect("dir entry").path();
                let rel = path.strip_prefix(&root).expect("under root").to_string_lossy().into_owned();
                if rel.contains("node_modules") || rel.contains("/target") || rel.contains("__pycache__") {
                    continue;
                }
                if path.is_dir() {
                    stack.push(path);
                } else if keep(&rel) {
                    files.push(rel);
                }
            }
        }
    };
    add_dir("docs", &|f| f.ends_with(".md"), &mut files);
    add_dir("systemd", &|_| true, &mut files);
    add_dir("packaging", &|_| true, &mut files);
    for dir in ["clients", "tests"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("read dir") {
            let readme = entry.expect("dir entry").path().join("README.md");
            if readme.exists() {
                files.push(readme.strip_prefix(&root).expect("under root").to_string_lossy().into_owned());
            }
        }
    }
    files.sort();
    files
}

/// One command line found in a file.
#[derive(Debug, Clone)]
struct Found {
    file: String,
    line: usize,
    /// The logical line (continuations joined), as written.
    text: String,
}

/// The command lines of one file, by its kind.
fn lines_of(file: &str, text: &str) -> Vec<Found> {
    let found = |line: usize, text: String| Found { file: file.to_owned(), line, text };
    let mut out = Vec::new();
    if file.ends_with(".md") {
        markdown(text, &mut |line, t| out.push(found(line, t)));
        return out;
    }
    let lines: Vec<&str> = text.lines().collect();
    let is_script = text.starts_with("#!");
    // Comments: code spans, and lines indented as code (three spaces or more
    // after the `#`), as Markdown would show them.
    let mut comment_code: Vec<(usize, String)> = Vec::new();
    let mut paragraph: Vec<(usize, String)> = Vec::new();
    let flush = |paragraph: &mut Vec<(usize, String)>, out: &mut Vec<Found>| {
        for (line, span) in spans(paragraph) {
            out.push(found(line, span));
        }
        paragraph.clear();
    };
    for (n, raw) in lines.iter().enumerate() {
        let trimmed = raw.trim_start();
        let Some(comment) = trimmed.strip_prefix('#').filter(|_| !trimmed.starts_with("#!")) else {
            flush(&mut paragraph, &mut out);
            continue;
        };
        if comment.starts_with("   ") {
            comment_code.push((n + 1, comment.to_owned()));
            flush(&mut paragraph, &mut out);
        } else if comment.trim().is_empty() {
            flush(&mut paragraph, &mut out);
        } else {
            paragraph.push((n + 1, comment.to_owned()));
        }
    }
    flush(&mut paragraph, &mut out);
    for (line, t) in logical_lines(&comment_code) {
        out.push(found(line, t));
    }
    if is_script {
        let numbered: Vec<(usize, String)> =
            lines.iter().enumerate().map(|(n, l)| (n + 1, (*l).to_owned())).collect();
        for (line, t) in logical_lines(&numbered) {
            out.push(found(line, t));
        }
    } else {
        // systemd units: the Exec…= lines (prefixes `-@:+!` stripped).
        for (n, l) in lines.iter().enumerate() {
            if let Some((key, value)) = l.split_once('=') {
                if key.trim().starts_with("Exec") {
                    out.push(found(n + 1, value.trim_start_matches(['-', '@', ':', '+', '!']).to_owned()));
                }
            }
        }
    }
    out
}

/// Joins `\` continuations and steps over here-document bodies.
fn logical_lines(lines: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (start, mut text) = (lines[i].0, lines[i].1.clone());
        while text.ends_with('\\') && i + 1 < lines.len() {
            text.pop();
            i += 1;
            text.push(' ');
            text.push_str(lines[i].1.trim_start());
        }
        i += 1;
        if let Some(end) = heredoc_end(&text) {
            while i < lines.len() && lines[i].1.trim() != end {
                i += 1;
            }
            i += 1;
        }
        out.push((start, text));
    }
    out
}

/// The terminator of a here-document that `line` starts (`<<EOF`,
/// `<<'EOF'`, `<<-EOF`), if any (not `<<<`).
fn heredoc_end(line: &str) -> Option<String> {
    let at = line.find("<<")?;
    let rest = &line[at + 2..];
    if rest.starts_with('<') {
        return None;
    }
    let word: String = rest
        .trim_start_matches('-')
        .trim_start()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ';' && *c != ')')
        .filter(|c| *c != '\'' && *c != '"')
        .collect();
    (!word.is_empty()).then_some(word)
}

/// Markdown: fenced shell blocks and inline code spans.
fn markdown(text: &str, emit: &mut dyn FnMut(usize, String)) {
    let lines: Vec<&str> = text.lines().collect();
    let mut paragraph: Vec<(usize, String)> = Vec::new();
    let mut i = 0;
    let flush = |paragraph: &mut Vec<(usize, String)>, emit: &mut dyn FnMut(usize, String)| {
        for (line, span) in spans(paragraph) {
            emit(line, span);
        }
        paragraph.clear();
    };
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let Some(lang) = trimmed.strip_prefix("```") else {
            if trimmed.is_empty() {
                flush(&mut paragraph, emit);
            } else {
                paragraph.push((i + 1, lines[i].to_owned()));
            }
            i += 1;
            continue;
        };
        flush(&mut paragraph, emit);
        let indent = lines[i].len() - trimmed.len();
        let lang = lang.trim().to_owned();
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            let l = lines[i];
            let cut = l.len() - l.trim_start().len();
            body.push((i + 1, l[cut.min(indent)..].to_owned()));
            i += 1;
        }
        i += 1;
        match lang.as_str() {
            "console" => {
                // The `$ ` lines and their continuations; the rest is output.
                let mut j = 0;
                while j < body.len() {
                    if let Some(cmd) = body[j].1.strip_prefix("$ ") {
                        let mut group = vec![(body[j].0, cmd.to_owned())];
                        while group.last().is_some_and(|(_, t)| t.ends_with('\\')) && j + 1 < body.len() {
                            j += 1;
                            group.push(body[j].clone());
                        }
                        for (line, t) in logical_lines(&group) {
                            emit(line, t);
                        }
                    }
                    j += 1;
                }
            }
            "" | "sh" | "bash" | "shell" => {
                for (line, t) in logical_lines(&body) {
                    emit(line, t);
                }
            }
            _ => {}
        }
    }
    flush(&mut paragraph, emit);
}

/// The inline code spans of a paragraph (a span may cross lines), each
/// with the line it starts on.
fn spans(paragraph: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut chars: Vec<(usize, char)> = Vec::new();
    for (line, text) in paragraph {
        chars.extend(text.chars().map(|c| (*line, c)));
        chars.push((*line, ' '));
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].1 != '`' {
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|(_, c)| *c == '`').count();
        let start = i + run;
        let mut j = start;
        let mut close = None;
        while j < chars.len() {
            if chars[j].1 == '`' {
                let r = chars[j..].iter().take_while(|(_, c)| *c == '`').count();
                if r == run {
                    close = Some(j);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                let span: String = chars[start..end].iter().map(|(_, c)| c).collect();
                if run > 1 {
                    // ``a message naming `keyhaven x` ``: the spans inside it too.
                    out.extend(spans(&[(chars[i].0, span.clone())]));
                }
                out.push((chars[i].0, span_command(span.trim())));
                i = end + run;
            }
            None => i = start,
        }
    }
    out
}

/// A code span as a command line: without a `$ ` prompt or a unit's
/// `ExecReload=` key, and with the alternatives of a synopsis's `[A | B]`
/// read one after the other (a `|` outside brackets stays a pipe).
fn span_command(span: &str) -> String {
    let span = span.strip_prefix("$ ").unwrap_or(span);
    let span = match span.split_once('=') {
        Some((key, value)) if key.starts_with("Exec") && key.chars().all(|c| c.is_ascii_alphabetic()) => {
            value
        }
        _ => span,
    };
    let mut depth = 0usize;
    span.chars()
        .map(|c| {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                '|' if depth > 0 => return ' ',
                _ => {}
            }
            c
        })
        .collect()
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    /// `|`, `||`, `&&`, `;`, `&`, `(`, `)`: ends a simple command.
    Op,
    /// A redirection; `true` when a target word follows (`> FILE`, not `>&2`).
    Redirect(bool),
}

/// Splits a shell line into tokens; the text of every `$(…)`, `` `…` ``,
/// `<(…)` goes to `subs` (and is split in turn by the caller).
fn tokens(line: &str, subs: &mut Vec<String>) -> Vec<Token> {
    let c: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    // The text up to the `)` that closes a `(` at `open`.
    let group = |open: usize| -> (String, usize) {
        let (mut depth, mut j, mut quote) = (0usize, open, None::<char>);
        while j < c.len() {
            match (quote, c[j]) {
                (Some(q), ch) if ch == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c[j]),
                (None, '(') => depth += 1,
                (None, ')') => {
                    depth -= 1;
                    if depth == 0 {
                        return (c[open + 1..j].iter().collect(), j + 1);
                    }
                }
                _ => {}
            }
            j += 1;
        }
        (c[open + 1..].iter().collect(), c.len())
    };
    let end_word = |word: &mut String, in_word: &mut bool, out: &mut Vec<Token>| {
        if *in_word {
            out.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while i < c.len() {
        let ch = c[i];
        match ch {
            ' ' | '\t' => {
                end_word(&mut word, &mut in_word, &mut out);
                i += 1;
            }
            '#' if !in_word => break,
            '\\' => {
                if let Some(next) = c.get(i + 1) {
                    word.push(*next);
                }
                in_word = true;
                i += 2;
            }
            '\'' => {
                let end = c[i + 1..].iter().position(|x| *x == '\'').map_or(c.len(), |p| i + 1 + p);
                word.extend(&c[i + 1..end]);
                in_word = true;
                i = end + 1;
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' && i + 1 < c.len() {
                        word.push(c[i + 1]);
                        i += 2;
                    } else if c[i] == '$' && c.get(i + 1) == Some(&'(') {
                        let (inner, next) = group(i + 1);
                        subs.push(inner);
                        word.push_str("$(…)");
                        i = next;
                    } else if c[i] == '`' {
                        let end = c[i + 1..].iter().position(|x| *x == '`').map_or(c.len(), |p| i + 1 + p);
                        subs.push(c[i + 1..end].iter().collect());
                        word.push_str("$(…)");
                        i = end + 1;
                    } else {
                        word.push(c[i]);
                        i += 1;
                    }
                }
                i += 1;
            }
            '$' if c.get(i + 1) == Some(&'(') => {
                let (inner, next) = group(i + 1);
                subs.push(inner);
                word.push_str("$(…)");
                in_word = true;
                i = next;
            }
            '$' if c.get(i + 1) == Some(&'{') => {
                let end = c[i..].iter().position(|x| *x == '}').map_or(c.len(), |p| i + p);
                word.extend(&c[i..=end.min(c.len() - 1)]);
                in_word = true;
                i = end + 1;
            }
            '`' => {
                let end = c[i + 1..].iter().position(|x| *x == '`').map_or(c.len(), |p| i + 1 + p);
                subs.push(c[i + 1..end].iter().collect());
                word.push_str("$(…)");
                in_word = true;
                i = end + 1;
            }
            '<' | '>' if c.get(i + 1) == Some(&'(') => {
                let (inner, next) = group(i + 1);
                subs.push(inner);
                word.push_str("$(…)");
                in_word = true;
                i = next;
            }
            '<' | '>' => {
                // A file descriptor number before it belongs to it.
                if in_word && word.chars().all(|d| d.is_ascii_digit()) {
                    word.clear();
                    in_word = false;
                }
                end_word(&mut word, &mut in_word, &mut out);
                let mut j = i;
                while j < c.len() && matches!(c[j], '<' | '>' | '|') {
                    j += 1;
                }
                let mut target = true;
                if c.get(j) == Some(&'&') {
                    j += 1;
                    while j < c.len() && (c[j].is_ascii_digit() || c[j] == '-') {
                        j += 1;
                        target = false;
                    }
                }
                out.push(Token::Redirect(target));
                i = j;
            }
            '&' if c.get(i + 1) == Some(&'>') => {
                end_word(&mut word, &mut in_word, &mut out);
                let j = i + 1 + c[i + 1..].iter().take_while(|x| **x == '>').count();
                out.push(Token::Redirect(true));
                i = j;
            }
            '|' | '&' | ';' | '(' | ')' => {
                end_word(&mut word, &mut in_word, &mut out);
                out.push(Token::Op);
                i += 1;
            }
            _ => {
                word.push(ch);
                in_word = true;
                i += 1;
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut out);
    out
}

/// The simple commands of a line (and of its substitutions), as words,
/// redirections removed.
fn simple_commands(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![line.to_owned()];
    while let Some(text) = pending.pop() {
        let mut subs = Vec::new();
        let mut cmd = Vec::new();
        let mut skip_next = false;
        for t in tokens(&text, &mut subs) {
            match t {
                Token::Word(w) if skip_next => {
                    let _ = w;
                    skip_next = false;
                }
                Token::Word(w) => cmd.push(w),
                Token::Redirect(target) => skip_next = target,
                Token::Op => {
                    skip_next = false;
                    if !cmd.is_empty() {
                        out.push(std::mem::take(&mut cmd));
                    }
                }
            }
        }
        if !cmd.is_empty() {
            out.push(cmd);
        }
        pending.extend(subs);
    }
    out
}

/// Steps over `sudo -u U`, `NAME=VALUE`, `runuser -u U --`, … to the
/// command word; `Some((binary, arguments))` when it is one of [`BINARIES`].
fn invocation(words: &[String]) -> Option<(&'static str, Vec<String>)> {
    let mut w: Vec<&str> = words.iter().map(String::as_str).collect();
    // Options of a wrapper that take a value.
    let wrapper = |w: &mut Vec<&str>, with_value: &[&str]| {
        w.remove(0);
        while let Some(first) = w.first().copied() {
            if first == "--" {
                w.remove(0);
                break;
            }
            if !first.starts_with('-') || first.len() < 2 {
                break;
            }
            w.remove(0);
            if with_value.contains(&first) && !w.is_empty() {
                w.remove(0);
            }
        }
    };
    loop {
        let first = w.first().copied()?;
        let is_assignment = first.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        });
        match first {
            _ if is_assignment => {
                w.remove(0);
            }
            "if" | "then" | "else" | "elif" | "do" | "while" | "until" | "!" | "{" | "time" | "exec"
            | "command" | "nohup" | "setsid" => {
                w.remove(0);
            }
            "sudo" => wrapper(&mut w, &["-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-R"]),
            "runuser" => wrapper(&mut w, &["-u", "-g", "-G", "-s", "-c"]),
            "env" => wrapper(&mut w, &["-u", "-C", "-S"]),
            "nice" => wrapper(&mut w, &["-n"]),
            "xargs" => wrapper(&mut w, &["-n", "-I", "-P", "-L", "-d", "-s", "-E", "-a"]),
            "systemd-run" => wrapper(
                &mut w,
                &[
                    "-p",
                    "--property",
                    "-u",
                    "--unit",
                    "--uid",
                    "--gid",
                    "-E",
                    "--setenv",
                    "--slice",
                    "--description",
                    "-M",
                    "--machine",
                    "--working-directory",
                    "--nice",
                    "--service-type",
                ],
            ),
            "timeout" => {
                wrapper(&mut w, &["-s", "-k", "--signal", "--kill-after"]);
                if !w.is_empty() {
                    w.remove(0);
                }
            }
            "ip" if w.get(1) == Some(&"netns") && w.get(2) == Some(&"exec") && w.len() > 3 => {
                w.drain(..4);
            }
            _ => break,
        }
    }
    let name = w[0].rsplit('/').next().unwrap_or(w[0]);
    let binary = BINARIES.iter().find(|b| **b == name)?;
    Some((binary, w[1..].iter().map(|s| (*s).to_owned()).collect()))
}

/// What one subcommand's `--help` lists.
#[derive(Debug, Default)]
struct Help {
    subcommands: Vec<String>,
    /// Option (`--long`, `-s`) to what it takes.
    options: HashMap<String, Opt>,
    /// It lists `Arguments:` (it takes positional values).
    takes_arguments: bool,
    /// The help as printed.
    text: String,
}

/// One option of a `--help`.
#[derive(Debug, Default, Clone)]
struct Opt {
    /// How many values follow it (`<VALUE>` in the help).
    values: usize,
    /// Its `[possible values: …]` (or the long help's `- NAME:` list), if any.
    possible: Vec<String>,
}

fn parse_help(text: &str) -> Help {
    let mut help = Help { text: text.to_owned(), ..Help::default() };
    let mut section = "";
    let mut current: Vec<String> = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        match section {
            "Commands:" if line.starts_with("  ") && !line.starts_with("   ") => {
                let name = line.split_whitespace().next().expect("a word");
                help.subcommands.push(name.to_owned());
            }
            "Arguments:" => help.takes_arguments = true,
            "Options:" => {
                let t = line.trim_start();
                let mut possible: Vec<String> = Vec::new();
                if t.starts_with('-') && !t.starts_with("- ") && line.len() - t.len() <= 6 {
                    // `-n, --lines <LINES>  description`: the part before the
                    // two-space gap.
                    let head = t.split("  ").next().expect("a part");
                    let values = head.matches('<').count();
                    current.clear();
                    for part in head.split(", ") {
                        let name = part.split([' ', '=']).next().expect("a name");
                        help.options.insert(name.to_owned(), Opt { values, possible: Vec::new() });
                        current.push(name.to_owned());
                    }
                } else if let Some(item) = t.strip_prefix("- ") {
                    // The long help's list: `- health: what it measures`.
                    if let Some((name, _)) = item.split_once(':') {
                        possible.push(name.trim().to_owned());
                    }
                }
                if let Some((_, list)) = t.split_once("[possible values: ") {
                    let list = list.split(']').next().expect("a list");
                    possible.extend(list.split(", ").map(str::to_owned));
                }
                for name in &current {
                    if let Some(opt) = help.options.get_mut(name) {
                        opt.possible.extend(possible.iter().cloned());
                    }
                }
            }
            _ => {}
        }
    }
    help
}

/// `--help` of each subcommand path, run once each.
#[derive(Default)]
struct Cli {
    cache: HashMap<(String, Vec<String>), Help>,
}

impl Cli {
    fn help(&mut self, binary: &str, path: &[String]) -> Result<&Help, String> {
        let key = (binary.to_owned(), path.to_vec());
        if !self.cache.contains_key(&key) {
            let out = Command::new(bin(binary)).args(path).arg("--help").output().expect("run --help");
            let shown = format!("{binary} {} --help", path.join(" "));
            if !out.status.success() {
                return Err(format!(
                    "`{shown}` exited {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let help = parse_help(&String::from_utf8(out.stdout).expect("UTF-8 help"));
            self.cache.insert(key.clone(), help);
        }
        Ok(&self.cache[&key])
    }

    /// Checks one invocation; its subcommand path when every word fits.
    fn check(&mut self, binary: &str, args: &[String]) -> Result<Vec<String>, String> {
        if binary == "khseal" {
            return khseal(args);
        }
        let mut path: Vec<String> = Vec::new();
        let mut positional = false;
        let mut i = 0;
        while i < args.len() {
            let raw = args[i].as_str();
            i += 1;
            // A synopsis's brackets and ellipses are read through.
            let word = raw.trim_start_matches(['[', '{']).trim_end_matches([']', '}']);
            let word = word.trim_end_matches("...").trim_end_matches('…');
            if word.is_empty() {
                continue;
            }
            let help = self.help(binary, &path)?;
            if word == "--" {
                break;
            }
            if let Some(long) = word.strip_prefix("--") {
                let (name, inline) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (long, None),
                };
                let option = format!("--{name}");
                let Some(opt) = help.options.get(&option).cloned() else {
                    return Err(unknown(binary, &path, &option, help));
                };
                let value = match inline {
                    Some(v) => Some(v),
                    None if opt.values > 0 => args.get(i).map(String::as_str),
                    None => None,
                };
                if inline.is_none() {
                    i += opt.values;
                }
                check_value(binary, &path, &option, &opt, value)?;
                continue;
            }
            if word.len() > 1 && word.starts_with('-') && !word[1..].starts_with(|c: char| c.is_ascii_digit())
            {
                // `-fn 5`, `-n5`: one letter after another until one takes a value.
                let letters: Vec<char> = word[1..].chars().collect();
                for (k, letter) in letters.iter().enumerate() {
                    let option = format!("-{letter}");
                    let Some(opt) = help.options.get(&option).cloned() else {
                        return Err(unknown(binary, &path, &option, help));
                    };
                    if opt.values > 0 {
                        let value = if k + 1 == letters.len() {
                            i += opt.values;
                            args.get(i - opt.values).map(String::as_str)
                        } else {
                            Some(&word[2 + k..])
                        };
                        check_value(binary, &path, &option, &opt, value)?;
                        break;
                    }
                }
                continue;
            }
            if !positional && help.subcommands.iter().any(|s| s == word) {
                path.push(word.to_owned());
                continue;
            }
            if !help.takes_arguments && !raw.starts_with(['[', '{']) {
                let subs = if help.subcommands.is_empty() {
                    "no subcommands".to_owned()
                } else {
                    format!("subcommands {}", help.subcommands.join(", "))
                };
                return Err(format!(
                    "`{binary}{}` takes no arguments and has no subcommand `{word}` (it has {subs})",
                    path.iter().map(|p| format!(" {p}")).collect::<String>()
                ));
            }
            positional = true;
        }
        // The path's own help must work too (a command ending in a subcommand).
        self.help(binary, &path)?;
        Ok(path)
    }

    /// Every subcommand path of a binary (not `help`), depth first.
    fn tree(&mut self, binary: &str) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![Vec::new()];
        while let Some(path) = stack.pop() {
            let subs = self.help(binary, &path).expect("help of a listed subcommand").subcommands.clone();
            for s in subs.into_iter().filter(|s| s != "help") {
                let mut p = path.clone();
                p.push(s);
                stack.push(p.clone());
                out.push(p);
            }
        }
        out.sort();
        out
    }
}

/// An option's value, when its help lists the possible ones: each of
/// them (a list may be comma-separated). Placeholders (`OP`, `$OP`,
/// `<OP>`, `…`) pass.
fn check_value(
    binary: &str,
    path: &[String],
    option: &str,
    opt: &Opt,
    value: Option<&str>,
) -> Result<(), String> {
    let Some(value) = value.filter(|_| !opt.possible.is_empty()) else { return Ok(()) };
    let placeholder = |v: &str| {
        v.contains(['$', '<', '…'])
            || v.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    };
    if placeholder(value) || opt.possible.iter().any(|p| p == value) {
        return Ok(());
    }
    match value.split(',').find(|v| !placeholder(v) && !opt.possible.iter().any(|p| p == v)) {
        None => Ok(()),
        Some(bad) => Err(format!(
            "`{binary}{} {option}` takes one of {}, not `{bad}`",
            path.iter().map(|p| format!(" {p}")).collect::<String>(),
            opt.possible.join(", ")
        )),
    }
}

fn unknown(binary: &str, path: &[String], option: &str, help: &Help) -> String {
    let mut known: Vec<&String> = help.options.keys().collect();
    known.sort();
    format!(
        "`{binary}{}` has no option `{option}` (its --help lists {})",
        path.iter().map(|p| format!(" {p}")).collect::<String>(),
        known.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
    )
}

/// `khseal SOCKET seal TENANT/KEY [K=V...]` and `khseal SOCKET open [K=V...]`.
fn khseal(args: &[String]) -> Result<Vec<String>, String> {
    match args {
        [_, cmd, ..] if cmd == "open" => Ok(vec![cmd.clone()]),
        [_, cmd, _, ..] if cmd == "seal" => Ok(vec![cmd.clone()]),
        _ => Err("khseal takes `SOCKET seal TENANT/KEY [K=V...]` or `SOCKET open [K=V...]`".to_owned()),
    }
}

/// One checked invocation.
struct Invocation {
    found: Found,
    binary: &'static str,
    args: Vec<String>,
}

impl Invocation {
    fn shown(&self) -> String {
        std::iter::once(self.binary.to_owned()).chain(self.args.iter().cloned()).collect::<Vec<_>>().join(" ")
    }
}

fn all_invocations() -> Vec<Invocation> {
    let root = root();
    let mut out = Vec::new();
    for file in doc_files() {
        let Ok(text) = std::fs::read_to_string(root.join(&file)) else { continue };
        for found in lines_of(&file, &text) {
            for words in simple_commands(&found.text) {
                if let Some((binary, args)) = invocation(&words) {
                    out.push(Invocation { found: found.clone(), binary, args });
                }
            }
        }
    }
    out
}

#[test]
fn every_documented_command_line_exists_as_written() {
    let invocations = all_invocations();
    if std::env::var_os("KEYHAVEN_CLI_DOCS_LIST").is_some() {
        for inv in &invocations {
            eprintln!("{}:{}: {}", inv.found.file, inv.found.line, inv.shown());
        }
    }
    let mut cli = Cli::default();
    let mut errors = Vec::new();
    let mut allowed_used = BTreeSet::new();
    let mut per_file: BTreeMap<&str, usize> = BTreeMap::new();
    for inv in &invocations {
        *per_file.entry(inv.found.file.as_str()).or_default() += 1;
        let shown = inv.shown();
        if let Some(k) = ALLOWED.iter().position(|(f, cmd, _)| *f == inv.found.file && *cmd == shown) {
            allowed_used.insert(k);
            continue;
        }
        if let Err(e) = cli.check(inv.binary, &inv.args) {
            errors.push(format!(
                "{}:{}: `{}`\n    {e}",
                inv.found.file,
                inv.found.line,
                inv.found.text.trim()
            ));
        }
    }
    for (k, (file, cmd, _)) in ALLOWED.iter().enumerate() {
        if !allowed_used.contains(&k) {
            errors.push(format!("ALLOWED entry matches nothing (remove it): {file}: `{cmd}`"));
        }
    }
    assert!(
        errors.is_empty(),
        "{} documented command lines do not run as written:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // The extraction itself: a reader that finds nothing would pass vacuously.
    for file in
        ["README.md", "docs/OPERATIONS.md", "docs/AUDIT.md", "docs/CLUSTER.md", "systemd/keyhavend.service"]
    {
        assert!(
            per_file.get(file).copied().unwrap_or(0) > 0,
            "no command line found in {file}: {per_file:?}"
        );
    }
    assert!(invocations.len() > 200, "only {} command lines found: {per_file:?}", invocations.len());
}

/// The binaries' own `--help` texts are docs too: the command lines they
/// quote (`keyhaven key public TENANT/KEY --format jwk`) exist as written.
#[test]
fn every_command_line_in_the_help_exists() {
    let mut cli = Cli::default();
    let mut errors = Vec::new();
    let mut seen = 0;
    for binary in ["keyhaven", "keyhavend"] {
        for path in std::iter::once(Vec::new()).chain(cli.tree(binary)) {
            let text = cli.help(binary, &path).expect("help").text.clone();
            let shown =
                format!("`{binary}{} --help`", path.iter().map(|p| format!(" {p}")).collect::<String>());
            let mut paragraph: Vec<(usize, String)> = Vec::new();
            for (n, line) in text.lines().chain([""]).enumerate() {
                if !line.trim().is_empty() {
                    paragraph.push((n + 1, line.trim().to_owned()));
                    continue;
                }
                for (line, span) in spans(&paragraph) {
                    for words in simple_commands(&span) {
                        let Some((b, args)) = invocation(&words) else { continue };
                        seen += 1;
                        if let Err(e) = cli.check(b, &args) {
                            errors.push(format!("{shown}, line {line}: `{span}`\n    {e}"));
                        }
                    }
                }
                paragraph.clear();
            }
        }
    }
    assert!(errors.is_empty(), "command lines in --help that do not exist:\n{}", errors.join("\n"));
    assert!(seen >= 3, "only {seen} command lines found in the help texts");
}

#[test]
fn every_subcommand_is_documented() {
    let invocations = all_invocations();
    let mut cli = Cli::default();
    let mut mentioned: BTreeSet<(String, Vec<String>)> = BTreeSet::new();
    for inv in &invocations {
        if let Ok(path) = cli.check(inv.binary, &inv.args) {
            for n in 1..=path.len() {
                mentioned.insert((inv.binary.to_owned(), path[..n].to_vec()));
            }
        }
    }
    let mut missing = Vec::new();
    for binary in ["keyhaven", "keyhavend"] {
        let tree = cli.tree(binary);
        // A help reader that finds no subcommands would pass vacuously.
        assert!(tree.len() >= 5, "{binary}: only {tree:?} read from --help");
        for path in tree {
            if !mentioned.contains(&(binary.to_owned(), path.clone())) {
                missing.push(format!("{binary} {}", path.join(" ")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "subcommands no doc shows as a command line or code span:\n{}",
        missing.join("\n")
    );
}

/// The reader and the checker on lines whose answer is known, so that a
/// reader that misses commands, or a checker that passes anything, fails.
#[test]
fn the_reader_and_the_checker_on_known_lines() {
    let commands = |line: &str| -> Vec<String> {
        simple_commands(line)
            .iter()
            .filter_map(|w| invocation(w))
            .map(|(b, a)| format!("{b} {}", a.join(" ")))
            .collect()
    };
    assert_eq!(
        commands("sudo -u keyhaven keyhavend init --config /etc/keyhaven/keyhaven.toml"),
        ["keyhavend init --config /etc/keyhaven/keyhaven.toml"]
    );
    assert_eq!(
        commands("runuser -u keyhaven -- softhsm2-util --init-token --label keyhaven --pin \"$(cat /etc/keyhaven/pin)\""),
        Vec::<String>::new()
    );
    assert_eq!(
        commands("KEY=$(keyhaven datakey acme/k --json | jq -r .plaintext) && echo ok # keyhaven x"),
        ["keyhaven datakey acme/k --json"]
    );
    assert_eq!(
        commands("printf hi | KEYHAVEN_TIMEOUT=5s target/release/keyhaven encrypt acme/k >ct 2>/dev/null; keyhaven decrypt <ct"),
        ["keyhaven encrypt acme/k", "keyhaven decrypt"]
    );
    assert_eq!(
        commands("systemd-run --wait --pipe -p User=keyhaven -p X=y keyhavend check --config F"),
        ["keyhavend check --config F"]
    );
    assert_eq!(commands("apt remove -y keyhaven; userdel keyhaven"), Vec::<String>::new());
    assert_eq!(
        commands(
            "sudo -E KEYHAVEN_SOCKET=/run/x.sock /usr/bin/keyhaven health && nice -n 5 keyhaven whoami &"
        ),
        ["keyhaven health", "keyhaven whoami"]
    );
    assert_eq!(
        commands("ip netns exec ns1 keyhavend run --config c.toml 2>&1 | tee log"),
        ["keyhavend run --config c.toml"]
    );
    let found = lines_of("x.md", "Run `keyhaven key\nshow acme/k` now.\n\n```console\n$ keyhaven health \\\n    --json\nkeyhaven: output\n```\n");
    let texts: Vec<&str> = found.iter().map(|f| f.text.as_str()).collect();
    assert_eq!(texts, ["keyhaven key show acme/k", "keyhaven health  --json"]);

    let mut cli = Cli::default();
    let check = |cli: &mut Cli, line: &str| {
        let (b, a) = invocation(&simple_commands(line)[0]).expect("an invocation");
        cli.check(b, &a)
    };
    assert_eq!(
        check(&mut cli, "keyhaven --socket S key create acme/k --type hmac-sha256").unwrap(),
        ["key", "create"]
    );
    assert_eq!(check(&mut cli, "keyhaven audit tail -fn 5").unwrap(), ["audit", "tail"]);
    assert!(check(&mut cli, "keyhaven key create acme/k --no-such-flag")
        .unwrap_err()
        .contains("--no-such-flag"));
    assert!(check(&mut cli, "keyhaven key craete acme/k").unwrap_err().contains("craete"));
    assert!(check(&mut cli, "keyhavend run --socket S").unwrap_err().contains("--socket"));
    assert!(check(&mut cli, "keyhaven audit tail -x").is_err());
    assert!(check(&mut cli, "keyhaven key public acme/k --format jwk").is_ok());
    assert!(check(&mut cli, "keyhaven key public acme/k --format=der").unwrap_err().contains("`der`"));
    assert!(check(&mut cli, "keyhaven bench --op encrypt,datakey-decrypt").is_ok());
    assert!(check(&mut cli, "keyhaven bench --op encrypt,sign-ed25519")
        .unwrap_err()
        .contains("sign-ed25519"));
    assert!(check(&mut cli, "keyhavend --log-format yaml run").unwrap_err().contains("yaml"));
    assert!(check(&mut cli, "keyhavend bench --token-latency-per call").is_ok());
    // A synopsis: brackets, alternatives, ellipses.
    let synopsis = span_command("keyhaven audit tail [-f] [-n N | --after SEQ] [--json] …");
    assert_eq!(check(&mut cli, &synopsis).unwrap(), ["audit", "tail"]);
    let synopsis = span_command("keyhaven audit tail [-n N | --before SEQ]");
    assert!(check(&mut cli, &synopsis).unwrap_err().contains("--before"));
    assert_eq!(span_command("ExecReload=keyhaven admin reload"), "keyhaven admin reload");
}

/// `keyhaven key create --help` lists every key type the daemon makes
/// (`KeyType::ALL`, the daemon's own list), each with what it is for; a
/// type it does not know is refused by the command line (exit 2, nothing
/// sent) naming them all, and `ed25519` says why it is not one.
#[test]
fn key_create_help_lists_every_key_type_and_refuses_others_with_the_list() {
    let run = |args: &[&str]| {
        let out = Command::new(bin("keyhaven"))
            .args(args)
            .env("KEYHAVEN_SOCKET", "/nonexistent/keyhaven.sock")
            .output()
            .expect("keyhaven");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let names: Vec<&str> = keyhaven::KeyType::ALL.iter().map(|t| t.as_str()).collect();
    let (code, help, _) = run(&["key", "create", "--help"]);
    assert_eq!(code, Some(0), "{help}");
    let listed =
        help.split_once("Possible values:").map(|(_, rest)| rest).unwrap_or_else(|| panic!("{help}"));
    for name in &names {
        assert!(
            listed.contains(&format!("- {name}: ")),
            "`{name}` is not among the possible values:\n{help}"
        );
    }
    let (code, short, _) = run(&["key", "create", "-h"]);
    assert_eq!(code, Some(0), "{short}");
    assert!(short.contains(&format!("[possible values: {}]", names.join(", "))), "{short}");
    for bad in ["ed448", "AES256-GCM", "rsa"] {
        let (code, _, err) = run(&["key", "create", "acme/k", "--type", bad]);
        assert_eq!(code, Some(2), "`--type {bad}` is a usage error: {err}");
        assert!(err.contains(&format!("one of {}", names.join(", "))), "`--type {bad}`: {err}");
        assert!(!err.contains("connect"), "nothing was sent: {err}");
    }
    let (code, _, err) = run(&["key", "create", "acme/k", "--type", "ed25519"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`ed25519` is not available") && err.contains("ecdsa-p256"), "{err}");
}
