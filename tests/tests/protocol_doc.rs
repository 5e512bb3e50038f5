//! docs/PROTOCOL.md §3 is what independent clients are written from, so it
//! is checked here against the real daemon (real token, real socket):
//!
//! 1. each operation's params table: every documented param is known to the
//!    daemon (a value of the wrong JSON type is `bad_request` naming that
//!    field, not "unknown field"), the daemon knows no param the table
//!    lacks, and an undocumented param is refused with `bad_request`, as
//!    §2.1 says;
//! 2. its response: a real call answers an `ok` object whose every field is
//!    documented, with the documented JSON type, and holds every documented
//!    field that the table does not mark as sometimes absent;
//! 3. its JSON examples: each request line is a request for the heading's
//!    operation with documented params of the documented types, each
//!    response line fits the response table the same way, and each error
//!    code in them is one of §4's;
//! 4. each code an "Errors:" sentence names is one of §4's, and §4's
//!    "returned by" for that code names the operation; and each key
//!    operation, called on keys missing, of every type, disabled, pending
//!    deletion, retired, trimmed, suspended and destroyed, answers only
//!    codes that its "Errors:" sentence (or §3's common list) names.
//!
//! The document is parsed as it is written: a `| param | type | |` table or
//! "Params: none"; a `| response field | type | |` table or "Response: a
//! **Name**" naming a `| field | type | |` table (KeyInfo, KeyDetails,
//! VersionDetails, Revocation, AliasInfo) or "the same fields as `op`".

use std::collections::{BTreeMap, BTreeSet};

use keyhaven_tests::*;
use serde_json::{json, Map, Value};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");

/// Words in a response field's description that mark it as sometimes
/// absent (§3's "Reading an operation's section"): every other documented
/// field is always sent.
const ABSENT_MARKERS: &[&str] = &["absent", "present only", "present when", "omitted", "only:", "only;"];

#[derive(Debug, Clone)]
struct Field {
    name: String,
    ty: String,
    desc: String,
}

impl Field {
    /// Whether the table says the field may be left out.
    fn sometimes_absent(&self) -> bool {
        let d = self.desc.to_lowercase();
        // "absent from a daemon that predates it" speaks of older daemons:
        // this one sends the field.
        let d = d
            .replace("absent from a daemon that predates it", "")
            .replace("absent from a daemon that predates them", "")
            .replace("absent from a daemon without the `key_shape` feature", "")
            .replace("absent from older daemons", "")
            .replace("a daemon that predates types sends none", "");
        ABSENT_MARKERS.iter().any(|m| d.contains(m)) || d.starts_with("optional") || d.contains("only,")
    }
}

#[derive(Debug, Clone)]
enum Response {
    Table(Vec<Field>),
    Named(String),
    SameAs(String),
}

#[derive(Debug, Default)]
struct OpDoc {
    op: String,
    section: String,
    params: Option<Vec<Field>>,
    response: Option<Response>,
    /// Example lines, in order.
    examples: Vec<Value>,
    /// Backticked words of its "Errors:" sentences.
    errors: Vec<String>,
    /// Whether it has one ("Errors: none besides the common ones." too).
    errors_said: bool,
    /// Every backticked word in its tables' descriptions.
    table_words: BTreeSet<String>,
}

struct Doc {
    ops: Vec<OpDoc>,
    /// The `| field | type | |` tables, by the **Name** before them.
    named: BTreeMap<String, Vec<Field>>,
    /// §4's codes.
    codes: BTreeSet<String>,
    /// §4's "returned by" cell of each code.
    returned_by: BTreeMap<String, String>,
    /// §2.1's text.
    requests_section: String,
}

/// Splits a table row into cells, ignoring `|` inside backticks.
fn cells(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_code = false;
    for ch in line.trim().trim_start_matches('|').chars() {
        match ch {
            '`' => {
                in_code = !in_code;
                cur.push(ch);
            }
            '|' if !in_code => out.push(std::mem::take(&mut cur).trim().to_owned()),
            _ => cur.push(ch),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// The backticked words of `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// The rows of a table as fields: `` `a`, `b` `` is two fields; a name
/// starting with `.` is relative to the previous name's parent; `string,
/// object` for two names gives each its type.
fn fields(rows: &[Vec<String>]) -> Vec<Field> {
    let mut out: Vec<Field> = Vec::new();
    for row in rows {
        let names = backticked(&row[0]);
        let types: Vec<&str> = row[1].split(", ").collect();
        let desc = row.get(2).cloned().unwrap_or_default();
        let mut parent = String::new();
        for (i, name) in names.iter().enumerate() {
            let name =
                if let Some(rel) = name.strip_prefix('.') { format!("{parent}.{rel}") } else { name.clone() };
            parent = name.rsplit_once('.').map(|(p, _)| p.to_owned()).unwrap_or_default();
            let ty = if types.len() == names.len() { types[i].to_owned() } else { row[1].clone() };
            out.push(Field { name, ty, desc: desc.clone() });
        }
    }
    out
}

const NAMED: &[&str] = &["KeyInfo", "KeyDetails", "VersionDetails", "Revocation", "AliasInfo"];

fn parse_doc() -> Doc {
    let lines: Vec<&str> = DOC.lines().collect();
    let mut ops: Vec<OpDoc> = Vec::new();
    let mut named = BTreeMap::new();
    let mut codes = BTreeSet::new();
    let mut returned_by = BTreeMap::new();
    let mut in_s3 = false;
    let mut in_s4 = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with("## ") {
            in_s3 = line.starts_with("## 3.");
            in_s4 = line.starts_with("## 4.");
        }
        if in_s4 && line.starts_with("| `") {
            let code = backticked(line)[0].clone();
            returned_by.insert(code.clone(), cells(line).last().cloned().unwrap_or_default());
            codes.insert(code);
        }
        if !in_s3 {
            i += 1;
            continue;
        }
        if let Some(rest) = line.strip_prefix("### 3.") {
            let (num, _) = rest.split_once(' ').expect("heading");
            ops.push(OpDoc {
                op: backticked(line)[0].clone(),
                section: format!("3.{num}"),
                ..Default::default()
            });
            i += 1;
            continue;
        }
        let Some(op) = ops.last_mut() else {
            i += 1;
            continue;
        };
        if line.starts_with('|') {
            let start = i;
            let mut rows = Vec::new();
            while i < lines.len() && lines[i].starts_with('|') {
                rows.push(cells(lines[i]));
                i += 1;
            }
            let header = rows[0][0].clone();
            let body: Vec<Vec<String>> = rows[2..].to_vec();
            for r in &body {
                for w in backticked(&r[2..].join(" ")) {
                    op.table_words.insert(w);
                }
            }
            match header.as_str() {
                "param" => {
                    assert!(op.params.is_none(), "§{}: two params tables", op.section);
                    op.params = Some(fields(&body));
                }
                "response field" => {
                    assert!(op.response.is_none(), "§{}: two response tables", op.section);
                    op.response = Some(Response::Table(fields(&body)));
                }
                "field" => {
                    // Named by the **Name** on the line before.
                    let before = lines[..start].iter().rev().find(|l| !l.trim().is_empty()).unwrap();
                    let name = before
                        .split("**")
                        .skip(1)
                        .step_by(2)
                        .find(|n| NAMED.contains(n))
                        .unwrap_or_else(|| {
                            panic!("§{}: a `| field |` table after {before:?} names no type", op.section)
                        })
                        .to_owned();
                    if before.starts_with("Response:") {
                        op.response = Some(Response::Named(name.clone()));
                    }
                    assert!(named.insert(name.clone(), fields(&body)).is_none(), "{name} defined twice");
                }
                _ => {}
            }
            continue;
        }
        if line.starts_with("```json") {
            i += 1;
            while !lines[i].starts_with("```") {
                let v: Value = serde_json::from_str(lines[i])
                    .unwrap_or_else(|e| panic!("§{} example {:?}: {e}", op.section, lines[i]));
                op.examples.push(v);
                i += 1;
            }
            i += 1;
            continue;
        }
        if line.contains("Params: none") {
            assert!(op.params.is_none(), "§{}", op.section);
            op.params = Some(Vec::new());
        }
        if let Some(at) = line.find("Response:") {
            let said = &line[at..];
            if op.response.is_none() {
                if let Some(n) = NAMED.iter().find(|n| said.contains(*n)) {
                    op.response = Some(Response::Named((*n).to_owned()));
                } else if said.contains("the same fields as `") {
                    op.response = Some(Response::SameAs(backticked(said)[0].clone()));
                }
            }
        }
        if let Some(at) = line.find("Errors") {
            // The sentence runs to the end of the paragraph.
            let mut text = line[at..].to_owned();
            let mut j = i + 1;
            while j < lines.len() && !lines[j].trim().is_empty() && !lines[j].starts_with('#') {
                text.push(' ');
                text.push_str(lines[j]);
                j += 1;
            }
            if text.starts_with("Errors:") || text.starts_with("Errors,") {
                op.errors_said = true;
                op.errors.extend(backticked(&text));
            }
        }
        i += 1;
    }
    let start = DOC.find("### 2.1").unwrap();
    let end = DOC.find("### 2.2").unwrap();
    Doc { ops, named, codes, returned_by, requests_section: DOC[start..end].to_owned() }
}

impl Doc {
    fn op(&self, name: &str) -> &OpDoc {
        self.ops.iter().find(|o| o.op == name).unwrap_or_else(|| panic!("no §3 heading for `{name}`"))
    }

    /// The documented fields of `op`'s `ok` object.
    fn response_fields(&self, op: &str) -> Vec<Field> {
        match self.op(op).response.as_ref().unwrap_or_else(|| panic!("`{op}`: no response documented")) {
            Response::Table(f) => f.clone(),
            Response::Named(n) => self.named[n].clone(),
            Response::SameAs(o) => self.response_fields(o),
        }
    }

    /// Checks `v` against the documented type `ty`; problems go to `errs`.
    fn check_value(&self, ty: &str, v: &Value, at: &str, require: bool, errs: &mut Vec<String>) {
        let ty = ty.split(" (§").next().unwrap().trim();
        if let Some(t) = ty.strip_suffix(" or `null`") {
            if v.is_null() {
                return;
            }
            return self.check_value(t, v, at, require, errs);
        }
        let ok = match ty {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "bool" | "boolean" => v.is_boolean(),
            "object" | "scope object" | "record objects" => v.is_object(),
            "integers" => return self.check_value("integer", v, at, require, errs),
            t if NAMED.contains(&t) => {
                if let Some(obj) = v.as_object() {
                    self.check_object(&self.named[t].clone(), obj, at, require, errs);
                    true
                } else {
                    false
                }
            }
            t if t.starts_with("`{") => {
                // An inline shape: `{a, b?}`.
                if let Some(obj) = v.as_object() {
                    let inner = t.trim_matches('`').trim_start_matches('{').trim_end_matches('}');
                    let shape: Vec<&str> = inner.split(',').map(str::trim).collect();
                    for k in obj.keys() {
                        if !shape.iter().any(|s| s.trim_end_matches('?') == k) {
                            errs.push(format!("{at}: field `{k}` is not in {t}"));
                        }
                    }
                    for s in shape.iter().filter(|s| !s.ends_with('?')) {
                        if require && !obj.contains_key(*s) {
                            errs.push(format!("{at}: field `{s}` of {t} is missing"));
                        }
                    }
                    true
                } else {
                    false
                }
            }
            t if t == "array" || t.starts_with("array of ") => {
                if let Some(items) = v.as_array() {
                    if let Some(elem) = t.strip_prefix("array of ") {
                        for (n, item) in items.iter().enumerate() {
                            self.check_value(elem, item, &format!("{at}[{n}]"), require, errs);
                        }
                    }
                    true
                } else {
                    false
                }
            }
            other => {
                errs.push(format!("{at}: PROTOCOL.md gives the type `{other}`, which this test cannot read"));
                return;
            }
        };
        if !ok {
            errs.push(format!("{at}: documented as {ty}, answered {v}"));
        }
    }

    /// Checks an object against documented fields: nothing undocumented,
    /// nothing always-present missing (when `require`), every type right.
    /// Dotted names (`token.ok`) and `name[].x` describe nested fields.
    fn check_object(
        &self,
        fields: &[Field],
        obj: &Map<String, Value>,
        at: &str,
        require: bool,
        errs: &mut Vec<String>,
    ) {
        let top = |name: &str| name.split(['.', '[']).next().unwrap().to_owned();
        for k in obj.keys() {
            if !fields.iter().any(|f| top(&f.name) == *k) {
                errs.push(format!("{at}: field `{k}` is not documented"));
            }
        }
        let tops: BTreeSet<String> = fields.iter().map(|f| top(&f.name)).collect();
        for name in tops {
            let direct = fields.iter().find(|f| f.name == name);
            let nested: Vec<Field> = fields
                .iter()
                .filter_map(|f| {
                    let rest = f.name.strip_prefix(&name)?;
                    let rest = rest.strip_prefix('.').or_else(|| rest.strip_prefix("[]."))?;
                    Some(Field { name: rest.to_owned(), ..f.clone() })
                })
                .collect();
            let absent_ok = match direct {
                Some(f) => f.sometimes_absent(),
                None => nested.first().is_some_and(Field::sometimes_absent),
            };
            let Some(v) = obj.get(&name) else {
                if require && !absent_ok {
                    errs.push(format!("{at}: documented field `{name}` is missing"));
                }
                continue;
            };
            let here = format!("{at}.{name}");
            if let Some(f) = direct {
                self.check_value(&f.ty, v, &here, require, errs);
            }
            if nested.is_empty() {
                continue;
            }
            let is_array = fields.iter().any(|f| f.name.starts_with(&format!("{name}[].")));
            match (is_array, v) {
                (true, Value::Array(items)) => {
                    for (n, item) in items.iter().enumerate() {
                        match item.as_object() {
                            Some(o) => self.check_object(&nested, o, &format!("{here}[{n}]"), require, errs),
                            None => errs.push(format!("{here}[{n}]: not an object")),
                        }
                    }
                }
                (false, Value::Object(o)) => self.check_object(&nested, o, &here, require, errs),
                _ => errs.push(format!("{here}: documented with nested fields, answered {v}")),
            }
        }
    }
}

/// The documented params of `op` (an empty list for "Params: none").
fn params(doc: &Doc, op: &str) -> Vec<Field> {
    doc.op(op).params.clone().unwrap_or_else(|| panic!("`{op}`: no params table and no \"Params: none\""))
}

/// A value of the JSON type `ty`.
fn right_value(ty: &str) -> Value {
    match ty.split(' ').next().unwrap() {
        "string" => json!("x"),
        "integer" => json!(1),
        "bool" | "boolean" => json!(true),
        "object" | "scope" => json!({}),
        "array" => json!([]),
        other => panic!("no value for `{other}`"),
    }
}

/// A value of another JSON type than `ty`.
fn wrong_value(ty: &str) -> Value {
    match ty.split(' ').next().unwrap() {
        "string" => json!(12345),
        "integer" => json!("12"),
        "bool" | "boolean" => json!("true"),
        "object" | "scope" => json!("x"),
        "array" => json!("x"),
        other => panic!("no wrong value for `{other}`"),
    }
}

#[test]
fn the_document_is_complete_and_its_examples_and_errors_agree_with_its_tables() {
    let doc = parse_doc();
    assert!(doc.ops.len() >= 40, "§3 operations: {}", doc.ops.len());
    assert!(doc.codes.len() >= 20 && doc.codes.contains("bad_request"), "§4 codes: {:?}", doc.codes);
    for name in NAMED {
        assert!(doc.named.contains_key(*name), "no `| field | type | |` table for **{name}**");
    }
    let mut errs = Vec::new();
    // §3's summary table lists every heading, with its section number.
    let summary: Vec<(String, String)> = DOC
        .lines()
        .skip_while(|l| !l.starts_with("| op | § |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let c = cells(l);
            (backticked(&c[0])[0].clone(), c[1].clone())
        })
        .collect();
    let headings: Vec<(String, String)> = doc.ops.iter().map(|o| (o.op.clone(), o.section.clone())).collect();
    if summary != headings {
        errs.push(format!("§3's table lists {summary:?}; the headings are {headings:?}"));
    }
    // The token's errors: §4's rows name every operation whose "uses token"
    // cell in §3's table says yes (and no other), `master_key_unavailable`
    // all of them but `verify` (hsm_failures.rs calls each in the rows
    // while the PIN is refused).
    let uses_token: BTreeSet<String> = DOC
        .lines()
        .skip_while(|l| !l.starts_with("| op | § | uses token |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(cells)
        .filter(|c| c[2].starts_with("yes"))
        .map(|c| backticked(&c[0])[0].clone())
        .collect();
    assert!(uses_token.len() >= 15 && uses_token.contains("mac"), "§3's uses-token column: {uses_token:?}");
    let op_names: BTreeSet<String> = doc.ops.iter().map(|o| o.op.clone()).collect();
    for (code, except) in [
        ("hsm_unavailable", &[][..]),
        ("hsm_login_failed", &[][..]),
        ("master_key_unavailable", &["verify"][..]),
    ] {
        let listed: BTreeSet<String> =
            backticked(&doc.returned_by[code]).into_iter().filter(|w| op_names.contains(w)).collect();
        let want: BTreeSet<String> =
            uses_token.iter().filter(|o| !except.contains(&o.as_str())).cloned().collect();
        if listed != want {
            errs.push(format!(
                "§4 `{code}` is returned by {listed:?}; the operations that use the token (§3's table{}) are {want:?}",
                if except.is_empty() { String::new() } else { format!(", but {except:?}") }
            ));
        }
    }
    for op in &doc.ops {
        let s = &op.section;
        if op.params.is_none() {
            errs.push(format!("§{s} `{}`: no params table and no \"Params: none\"", op.op));
        }
        if op.response.is_none() {
            errs.push(format!("§{s} `{}`: no response table and no \"Response: a **Name**\"", op.op));
        }
        if op.params.is_none() || op.response.is_none() {
            continue;
        }
        if !op.errors_said {
            errs.push(format!("§{s} `{}`: no \"Errors:\" sentence", op.op));
        }
        // 4. The codes of its "Errors:" sentences are §4's. Other words in
        // backticks there are the op's own params, fields, values or names.
        let own: BTreeSet<String> = params(&doc, &op.op)
            .iter()
            .map(|f| f.name.clone())
            .chain(doc.response_fields(&op.op).iter().map(|f| f.name.clone()))
            .chain(op.table_words.iter().cloned())
            .chain(doc.ops.iter().map(|o| o.op.clone()))
            .collect();
        for word in &op.errors {
            // Scope kinds (§3.13) are named there too.
            let codelike = word.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                && !["all", "datakey", "key", "tenant"].contains(&word.as_str());
            if codelike && !doc.codes.contains(word) && !own.contains(word) {
                errs.push(format!("§{s} `{}`: Errors names `{word}`, which is not a §4 code", op.op));
            }
            // And §4 says that the operation returns it.
            if let Some(by) = doc.returned_by.get(word) {
                let said =
                    by.contains(&format!("`{}`", op.op)) || by.contains("any op") || by.contains("every op");
                if !said {
                    errs.push(format!(
                        "§{s} `{}`: Errors names `{word}`, whose §4 row does not list it",
                        op.op
                    ));
                }
            }
        }
        // 3. The examples.
        let documented: BTreeMap<String, Field> =
            params(&doc, &op.op).into_iter().map(|f| (f.name.clone(), f)).collect();
        let response = doc.response_fields(&op.op);
        let mut last_request_id = None;
        for ex in &op.examples {
            let at = format!("§{s} example {ex}");
            let obj = ex.as_object().unwrap_or_else(|| panic!("{at}: not an object"));
            if obj.contains_key("op") {
                for k in obj.keys() {
                    if !["id", "op", "params"].contains(&k.as_str()) {
                        errs.push(format!("{at}: top-level field `{k}` (§2.1 allows id, op, params)"));
                    }
                }
                if obj["op"] != op.op.as_str() {
                    errs.push(format!("{at}: a request for `{}` under the heading `{}`", obj["op"], op.op));
                }
                if !obj.get("id").is_some_and(Value::is_u64) {
                    errs.push(format!("{at}: `id` is not an unsigned integer"));
                }
                last_request_id = obj.get("id").cloned();
                match obj.get("params") {
                    None | Some(Value::Null) => {}
                    Some(Value::Object(p)) => {
                        for (k, v) in p {
                            match documented.get(k) {
                                None => errs.push(format!("{at}: param `{k}` is not in the params table")),
                                Some(f) => doc.check_value(&f.ty, v, &format!("{at}: {k}"), true, &mut errs),
                            }
                        }
                    }
                    Some(other) => errs.push(format!("{at}: params {other} is not an object")),
                }
            } else if let Some(ok) = obj.get("ok") {
                let ok = ok.as_object().unwrap_or_else(|| panic!("{at}: `ok` is not an object"));
                doc.check_object(&response, ok, &at, true, &mut errs);
                if last_request_id.take().is_some_and(|id| Some(&id) != obj.get("id")) {
                    errs.push(format!("{at}: its id is not the id of the request before it"));
                }
            } else if let Some(e) = obj.get("error") {
                let code = e["code"].as_str().unwrap_or_default();
                if !doc.codes.contains(code) {
                    errs.push(format!("{at}: error code `{code}` is not in §4"));
                }
                if !e["message"].is_string() {
                    errs.push(format!("{at}: error without a message"));
                }
            } else {
                errs.push(format!("{at}: neither a request nor a response"));
            }
        }
    }
    assert!(errs.is_empty(), "PROTOCOL.md disagrees with itself:\n{}", errs.join("\n"));
}

/// §2.5's encodings, wherever a field of that name is answered: envelope
/// ids are 32 lowercase hex digits, key versions are ≥ 1, times (`…_at`)
/// are Unix seconds.
fn check_encodings(v: &Value, at: &str, errs: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let here = format!("{at}.{k}");
                let bad = match k.as_str() {
                    "envelope_id" => !x.as_str().is_some_and(|s| {
                        s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    }),
                    "key_version" | "current_version" | "from_version" | "min_decryption_version" => {
                        x.as_u64().is_none_or(|n| n < 1)
                    }
                    k if k.ends_with("_at") => x.as_u64().is_none_or(|n| n <= 1_600_000_000),
                    _ => false,
                };
                if bad {
                    errs.push(format!("{here}: {x} is not as §2.5 encodes it"));
                }
                check_encodings(x, &here, errs);
            }
        }
        Value::Array(items) => items.iter().for_each(|x| check_encodings(x, at, errs)),
        _ => {}
    }
}

/// The operations this test does not call for real, and why. Empty today:
/// every operation of §3 is called below.
const NOT_CALLED: &[(&str, &str)] = &[];

/// The daemon's answer to a request refused for its params, split into
/// the code and the message.
fn refusal(r: Result<Value, keyhaven::Error>) -> Result<(ErrorCode, String), String> {
    match r {
        Ok(v) => Err(format!("accepted, answering {v}")),
        Err(e) => match &e {
            keyhaven::Error::Daemon { code, message } => Ok((*code, message.clone())),
            other => Err(format!("not a daemon error: {other}")),
        },
    }
}

/// The field names an unknown-field message says the daemon takes
/// (serde's "expected one of `a`, `b`", "expected `a`", "there are no fields").
fn known_fields(message: &str) -> Option<BTreeSet<String>> {
    if message.contains("there are no fields") {
        return Some(BTreeSet::new());
    }
    let (_, list) = message.split_once(", expected ")?;
    Some(backticked(list).into_iter().collect())
}

/// Calls for real, recording the answer under the op's name.
struct Calls<'a> {
    c: &'a Client,
    answers: Vec<(String, Value)>,
}

impl Calls<'_> {
    async fn call(&mut self, op: &str, params: Value) -> Value {
        let v =
            self.c.call_raw(op, params.clone()).await.unwrap_or_else(|e| panic!("`{op}` with {params}: {e}"));
        self.answers.push((op.to_owned(), v.clone()));
        v
    }

    /// A call made to set things up; its answer is not checked.
    async fn setup(&self, op: &str, params: Value) -> Value {
        self.c.call_raw(op, params.clone()).await.unwrap_or_else(|e| panic!("`{op}` with {params}: {e}"))
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Wraps 32 random bytes to the PEM public key with RSA-OAEP-SHA-1, as a
/// customer does with openssl (OPERATIONS.md §16).
fn wrap_for_import(dir: &std::path::Path, pem: &str) -> String {
    std::fs::write(dir.join("wrapping.pem"), pem).unwrap();
    std::fs::write(dir.join("material.bin"), rand_bytes()).unwrap();
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            "wrapping.pem",
            "-in",
            "material.bin",
            "-out",
            "wrapped.bin",
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha1",
        ])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    b64(&std::fs::read(dir.join("wrapped.bin")).unwrap())
}

fn rand_bytes() -> Vec<u8> {
    let mut b = vec![0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).unwrap();
    b
}

/// One real, successful call of every operation of §3, each in a tenant of
/// its own (named after the operation), with every documented param given
/// where one call can give them all.
async fn call_every_operation(c: &Client, events: &Client) -> Vec<(String, Value)> {
    let mut k = Calls { c, answers: Vec::new() };
    let now = keyhavend::ops::now_unix();

    // The master key first, while one key exists: a rotation, then the old
    // version retired once nothing is wrapped under it.
    k.setup("key_create", json!({"tenant": "master", "key": "k"})).await;
    let rotated = k.call("admin_rotate_master", json!({"batch": 100, "rollback": false})).await;
    assert_eq!(rotated["finished"], true, "{rotated}");
    k.setup("key_set", json!({"tenant": "master", "key": "k", "min_decryption_version": 2})).await;
    k.setup("key_trim", json!({"tenant": "master", "key": "k"})).await;
    k.call("admin_retire_master", json!({"version": 1})).await;

    k.call("hello", json!({"protocol": 1, "client": "protocol-doc-test"})).await;
    k.call("health", json!({})).await;
    k.call("whoami", json!({})).await;
    k.call("admin_reload", json!({})).await;
    k.call(
        "key_create",
        json!({"tenant": "key_create", "key": "k", "type": "hmac-sha256", "rotate_every_secs": 86400,
               "description": "what it is for", "tags": {"team": "billing"}, "idempotency_key": "create-1"}),
    )
    .await;
    for key in ["a", "b"] {
        k.setup("key_create", json!({"tenant": "key_list", "key": key, "tags": {"env": "prod"}})).await;
    }
    let page = k.call("key_list", json!({"tenant": "key_list", "limit": 1, "tags": {"env": "prod"}})).await;
    assert_eq!(page["next"], "key_list/a", "{page}");
    k.call("key_list", json!({"tenant": "key_list", "after": "key_list/a"})).await;

    // Encryption and data keys.
    let ctx = json!({"table": "t", "row": "1"});
    k.setup("key_create", json!({"tenant": "encrypt", "key": "k"})).await;
    let ct = k
        .call("encrypt", json!({"tenant": "encrypt", "key": "k", "plaintext": b64(b"hello"), "context": ctx}))
        .await;
    k.call("decrypt", json!({"ciphertext": ct["ciphertext"], "context": ctx})).await;
    let dk = k
        .call("datakey", json!({"tenant": "encrypt", "key": "k", "context": ctx, "include_plaintext": true}))
        .await;
    k.call("datakey", json!({"tenant": "encrypt", "key": "k", "include_plaintext": false})).await;
    k.call("datakey_decrypt", json!({"envelope": dk["envelope"], "context": ctx})).await;

    // The audit log.
    let read = k
        .call("audit_read", json!({"tenant": "encrypt", "since": 0, "after": 0, "last": 5, "raw": true}))
        .await;
    assert!(!read["records"].as_array().unwrap().is_empty(), "{read}");
    k.call("audit_verify", json!({})).await;
    k.call("audit_export", json!({"since": 0, "after": 0})).await;
    k.call("audit_public_key", json!({})).await;
    k.call("metrics", json!({})).await;

    // Revocations.
    let subscribed = events.call_raw("subscribe_revocations", json!({})).await.unwrap();
    k.answers.push(("subscribe_revocations".into(), subscribed));
    for key in ["k", "k2"] {
        k.setup("key_create", json!({"tenant": "revoke", "key": key})).await;
    }
    let scope = json!({"kind": "key", "tenant": "revoke", "key": "k"});
    k.call("revoke", json!({"scope": scope, "reason": "superseded", "expires_at": now + 3600})).await;
    k.setup(
        "revoke",
        json!({"scope": {"kind": "key", "tenant": "revoke", "key": "k2", "version": 1},
                             "reason": "key-compromise"}),
    )
    .await;
    // Its answer has `envelope_seen` unless the audit search ran out of
    // time (§3.13), so it is not required here.
    k.call(
        "revoke",
        json!({"scope": {"kind": "datakey", "envelope_id": dk["envelope_id"]},
                               "reason": "key-compromise"}),
    )
    .await;
    let list = k.call("revoke_list", json!({"tenant": "revoke", "limit": 1})).await;
    assert!(list.get("next").is_some(), "{list}");
    k.call("revoke_list", json!({"tenant": "revoke", "after": list["next"]})).await;
    k.call("revoke_lift", json!({"scope": scope, "reason": "unspecified"})).await;
    k.setup("key_create", json!({"tenant": "destroy", "key": "k"})).await;
    let doomed = json!({"kind": "key", "tenant": "destroy", "key": "k"});
    k.setup("revoke", json!({"scope": doomed, "reason": "cessation-of-operation"})).await;
    k.call("destroy", json!({"scope": doomed, "confirm": "destroy/k"})).await;

    // The key lifecycle.
    let t = |tenant: &str| json!({"tenant": tenant, "key": "k"});
    for tenant in [
        "key_rotate",
        "key_show",
        "key_set",
        "key_trim",
        "key_schedule_deletion",
        "key_cancel_deletion",
        "rewrap",
    ] {
        k.setup("key_create", t(tenant)).await;
    }
    k.call("key_rotate", json!({"tenant": "key_rotate", "key": "k", "idempotency_key": "rotate-1"})).await;
    k.call("key_show", t("key_show")).await;
    k.call(
        "key_set",
        json!({"tenant": "key_set", "key": "k", "min_decryption_version": 1, "rotate_every_secs": 86400,
               "state": "enabled", "description": "d", "set_tags": {"a": "1"}, "remove_tags": ["b"]}),
    )
    .await;
    k.setup("key_rotate", t("key_trim")).await;
    k.setup("key_set", json!({"tenant": "key_trim", "key": "k", "min_decryption_version": 2})).await;
    k.call("key_trim", t("key_trim")).await;
    for tenant in ["key_schedule_deletion", "key_cancel_deletion"] {
        k.call("key_schedule_deletion", json!({"tenant": tenant, "key": "k", "days": 7})).await;
    }
    k.call("key_cancel_deletion", t("key_cancel_deletion")).await;
    let old = k
        .setup("encrypt", json!({"tenant": "rewrap", "key": "k", "plaintext": b64(b"x"), "context": ctx}))
        .await;
    k.setup("key_rotate", t("rewrap")).await;
    let moved = k.call("rewrap", json!({"text": old["ciphertext"], "context": ctx})).await;
    assert_eq!((moved["from_version"].clone(), moved["key_version"].clone()), (json!(1), json!(2)));

    // MACs and signatures.
    k.setup("key_create", json!({"tenant": "mac", "key": "k", "type": "hmac-sha256"})).await;
    let tag = k.call("mac", json!({"tenant": "mac", "key": "k", "message": b64(b"m"), "version": 1})).await;
    k.call("mac_verify", json!({"tenant": "mac", "key": "k", "message": b64(b"m"), "tag": tag["tag"]})).await;
    k.setup("key_create", json!({"tenant": "sign", "key": "k", "type": "ecdsa-p256"})).await;
    let signed = k.call("sign", json!({"tenant": "sign", "key": "k", "message": b64(b"m")})).await;
    let digest = b64(&<sha2::Sha256 as sha2::Digest>::digest(b"m"));
    k.call("sign", json!({"tenant": "sign", "key": "k", "digest": digest})).await;
    k.call("public_key", json!({"tenant": "sign", "key": "k", "version": 1})).await;
    let checked = k
        .call(
            "verify",
            json!({"tenant": "sign", "key": "k", "version": 1, "message": b64(b"m"),
                   "signature": signed["signature"]}),
        )
        .await;
    assert_eq!(checked["valid"], true, "{checked}");
    k.call(
        "verify",
        json!({"tenant": "sign", "key": "k", "digest": digest, "signature": signed["signature"]}),
    )
    .await;

    // Bring your own key.
    let offer = k
        .call(
            "key_import_params",
            json!({"tenant": "key_import", "key": "k", "type": "aes256-gcm", "expires_in_secs": 600}),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let wrapped = wrap_for_import(dir.path(), offer["public_key"].as_str().unwrap());
    k.call(
        "key_import",
        json!({"tenant": "key_import", "key": "k", "import_token": offer["import_token"],
               "algorithm": "rsaes-oaep-sha1", "wrapped": wrapped}),
    )
    .await;

    // Aliases.
    for key in ["k1", "k2"] {
        k.setup("key_create", json!({"tenant": "alias", "key": key})).await;
    }
    k.call("alias_create", json!({"tenant": "alias", "alias": "a", "key": "k1"})).await;
    k.call("alias_update", json!({"tenant": "alias", "alias": "a", "key": "k2"})).await;
    k.call("alias_list", json!({"tenant": "alias"})).await;
    k.call("alias_list", json!({})).await;
    k.call("alias_delete", json!({"tenant": "alias", "alias": "a"})).await;
    k.answers
}

/// The codes every operation may return besides its "Errors:" list (§3's
/// opening paragraphs).
const COMMON_CODES: &[&str] = &["bad_request", "internal", "permission_denied", "store_unavailable"];

/// The key operations probed with keys in every state, and their params
/// for a key (`tenant`, `key`).
fn probe_params(op: &str, tenant: &str, key: &str) -> Value {
    use base64::Engine;
    let mut tag = vec![0, 0, 0, 1];
    tag.extend([7u8; 32]);
    let tag = format!("khm1:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag));
    let mut p = json!({"tenant": tenant, "key": key});
    let extra = match op {
        "encrypt" => json!({"plaintext": b64(b"p")}),
        "mac" | "sign" => json!({"message": b64(b"m")}),
        "mac_verify" => json!({"message": b64(b"m"), "tag": tag}),
        "verify" => json!({"message": b64(b"m"), "signature": b64(b"not a signature")}),
        "key_set" => json!({"description": "probed"}),
        "alias_create" => json!({"alias": format!("al-{key}")}),
        _ => json!({}),
    };
    p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    p
}

const PROBED: &[&str] = &[
    "encrypt",
    "datakey",
    "mac",
    "mac_verify",
    "sign",
    "verify",
    "public_key",
    "key_rotate",
    "key_show",
    "key_set",
    "key_trim",
    "key_schedule_deletion",
    "key_cancel_deletion",
    "key_import_params",
    "alias_create",
];

/// Each key operation on a key that is missing, of each type, disabled,
/// pending deletion, and under a suspended tenant: every error it answers
/// is one its "Errors:" sentence (or §3's common list) names.
async fn probe_key_states(doc: &Doc, c: &Client, errs: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for op in PROBED {
        let t = format!("pr_{op}");
        let s = format!("ps_{op}");
        for (key, ty) in [
            ("a", "aes256-gcm"),
            ("h", "hmac-sha256"),
            ("e", "ecdsa-p256"),
            ("d", "aes256-gcm"),
            ("p", "aes256-gcm"),
        ] {
            c.call_raw("key_create", json!({"tenant": t, "key": key, "type": ty})).await.unwrap();
        }
        c.call_raw("key_set", json!({"tenant": t, "key": "d", "state": "disabled"})).await.unwrap();
        c.call_raw("key_schedule_deletion", json!({"tenant": t, "key": "p"})).await.unwrap();
        c.call_raw("key_create", json!({"tenant": s, "key": "a"})).await.unwrap();
        c.call_raw("revoke", json!({"scope": {"kind": "tenant", "tenant": s}, "reason": "unspecified"}))
            .await
            .unwrap();
        let listed = &doc.op(op).errors;
        for (tenant, key) in [(&t, "zz"), (&t, "a"), (&t, "h"), (&t, "e"), (&t, "d"), (&t, "p"), (&s, "a")] {
            let sent = probe_params(op, tenant, key);
            if let Err(keyhaven::Error::Daemon { code, message }) = c.call_raw(op, sent.clone()).await {
                let code = code.as_str();
                seen.insert(code);
                // §4: the message names the key, its type and the type needed.
                if code == "wrong_key_type"
                    && !(message.contains(&format!("`{op}`")) && message.contains("type `"))
                {
                    errs.push(format!("`{op}` {sent}: a `wrong_key_type` message that does not name the operation and the types: {message}"));
                }
                if !listed.iter().any(|l| l == code) && !COMMON_CODES.contains(&code) {
                    errs.push(format!(
                        "`{op}` {sent} answered `{code}` ({message}), which its Errors sentence (§{}) does not name",
                        doc.op(op).section
                    ));
                }
            }
        }
    }
    // The probes reach the refusals they are for.
    for code in ["not_found", "wrong_key_type", "key_disabled", "revoked", "already_exists"] {
        assert!(seen.contains(code), "no probe answered `{code}`: {seen:?}");
    }
}

/// Each operation that opens a ciphertext or an envelope, on input made
/// under a key then disabled, scheduled for deletion, retired, trimmed,
/// suspended (its tenant) and destroyed: every error it answers is one its
/// "Errors:" sentence (or §3's common list) names.
async fn probe_opened_states(doc: &Doc, c: &Client, errs: &mut Vec<String>) {
    for op in ["decrypt", "datakey_decrypt", "rewrap"] {
        let mut seen = BTreeSet::new();
        let t = format!("po_{op}");
        let mut made = Vec::new();
        for key in ["a", "d", "p", "r", "x", "s", "z"] {
            let tenant = if key == "s" { format!("ps_{op}") } else { t.clone() };
            c.call_raw("key_create", json!({"tenant": tenant, "key": key})).await.unwrap();
            let ct = c
                .call_raw("encrypt", json!({"tenant": tenant, "key": key, "plaintext": b64(b"p")}))
                .await
                .unwrap();
            let dk = c.call_raw("datakey", json!({"tenant": tenant, "key": key})).await.unwrap();
            made.push((tenant, key, ct["ciphertext"].clone(), dk["envelope"].clone()));
        }
        let k = |key: &str| json!({"tenant": t, "key": key});
        c.call_raw("key_set", json!({"tenant": t, "key": "d", "state": "disabled"})).await.unwrap();
        c.call_raw("key_schedule_deletion", k("p")).await.unwrap();
        for key in ["r", "x"] {
            c.call_raw("key_rotate", k(key)).await.unwrap();
            c.call_raw("key_set", json!({"tenant": t, "key": key, "min_decryption_version": 2}))
                .await
                .unwrap();
        }
        c.call_raw("key_trim", k("x")).await.unwrap();
        let suspended = json!({"kind": "tenant", "tenant": format!("ps_{op}")});
        c.call_raw("revoke", json!({"scope": suspended, "reason": "unspecified"})).await.unwrap();
        let doomed = json!({"kind": "key", "tenant": t, "key": "z"});
        c.call_raw("revoke", json!({"scope": doomed, "reason": "key-compromise"})).await.unwrap();
        c.call_raw("destroy", json!({"scope": doomed, "confirm": format!("{t}/z")})).await.unwrap();
        let listed = &doc.op(op).errors;
        for (tenant, key, ct, env) in &made {
            let sent = match op {
                "decrypt" => json!({"ciphertext": ct}),
                "datakey_decrypt" => json!({"envelope": env}),
                _ => json!({"text": ct}),
            };
            if let Err(keyhaven::Error::Daemon { code, message }) = c.call_raw(op, sent).await {
                let code = code.as_str();
                seen.insert(code);
                if !listed.iter().any(|l| l == code) && !COMMON_CODES.contains(&code) {
                    errs.push(format!(
                        "`{op}` of input under `{tenant}/{key}` answered `{code}` ({message}), which its \
                         Errors sentence (§{}) does not name",
                        doc.op(op).section
                    ));
                }
            }
        }
        for code in ["key_disabled", "version_retired", "revoked"] {
            assert!(seen.contains(code), "no `{op}` probe answered `{code}`: {seen:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_takes_its_documented_params_and_answers_its_documented_fields() {
    let doc = parse_doc();
    // §2.1's rule for unknown params, asserted below for every operation.
    assert!(
        doc.requests_section.contains("Unknown fields in `params` are refused with `bad_request`"),
        "§2.1 no longer says how unknown params are treated: update this test"
    );
    let d = TestDaemon::start();
    let c = d.client().await;
    let events = d.client().await;
    let mut errs = Vec::new();

    // 1. Params: the daemon knows exactly the documented ones, with their types.
    for op in &doc.ops {
        let name = &op.op;
        let documented: BTreeSet<String> = params(&doc, name).iter().map(|f| f.name.clone()).collect();
        match refusal(c.call_raw(name, json!({"zz_undocumented": 1})).await) {
            Err(e) => errs.push(format!("`{name}` with an undocumented param: {e}")),
            Ok((code, msg)) => {
                if code != ErrorCode::BadRequest || !msg.contains("unknown field `zz_undocumented`") {
                    errs.push(format!("`{name}` with an undocumented param: {code}: {msg}"));
                }
                match known_fields(&msg) {
                    Some(known) if known != documented => errs.push(format!(
                        "`{name}`: the daemon takes params {known:?}, PROTOCOL.md §{} documents {documented:?}",
                        op.section
                    )),
                    Some(_) => {}
                    None => errs.push(format!("`{name}`: cannot read the params the daemon takes from {msg:?}")),
                }
            }
        }
        for p in params(&doc, name) {
            let wrong = wrong_value(&p.ty);
            let sent = json!({ (p.name.clone()): wrong });
            match refusal(c.call_raw(name, sent.clone()).await) {
                Err(e) => errs.push(format!("`{name}` {sent} (documented {}): {e}", p.ty)),
                Ok((code, msg)) => {
                    let named =
                        msg.contains(&format!("field `{}`", p.name)) && !msg.contains("unknown field");
                    if code != ErrorCode::BadRequest || !named {
                        errs.push(format!("`{name}` {sent} (documented {}): {code}: {msg}", p.ty));
                    }
                }
            }
            // A value of the documented type is not refused for its type
            // (it may be for what it is, or for the params left out).
            let sent = json!({ (p.name.clone()): right_value(&p.ty) });
            if let Err(keyhaven::Error::Daemon { message, .. }) = c.call_raw(name, sent.clone()).await {
                if message.contains(&format!("field `{}`: invalid type", p.name)) {
                    errs.push(format!("`{name}` {sent} (documented {}): {message}", p.ty));
                }
            }
        }
    }

    // 2. Responses: a real call of each.
    let answers = call_every_operation(&c, &events).await;
    // `hello`'s features are the ones §3.1's table explains, and its
    // example lists them all.
    let hello = &answers.iter().find(|(o, _)| o == "hello").unwrap().1;
    let features: BTreeSet<String> =
        hello["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect();
    let tabled: BTreeSet<String> = DOC
        .lines()
        .skip_while(|l| !l.starts_with("| feature |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|l| backticked(&cells(l)[0]))
        .collect();
    if features != tabled {
        errs.push(format!("`hello` answers the features {features:?}; §3.1's table explains {tabled:?}"));
    }
    let example = doc.op("hello").examples.iter().find_map(|e| e.get("ok")).unwrap()["features"].clone();
    if example != hello["features"] {
        errs.push(format!(
            "§3.1's example lists the features {example}; `hello` answers {}",
            hello["features"]
        ));
    }
    for op in &doc.ops {
        let name = &op.op;
        let mine: Vec<&Value> = answers.iter().filter(|(o, _)| o == name).map(|(_, v)| v).collect();
        if mine.is_empty() {
            if !NOT_CALLED.iter().any(|(o, _)| o == name) {
                errs.push(format!("`{name}` is not called for real, nor listed in NOT_CALLED"));
            }
            continue;
        }
        let fields = doc.response_fields(name);
        for v in mine {
            check_encodings(v, &format!("`{name}`"), &mut errs);
            match v.as_object() {
                Some(obj) => {
                    doc.check_object(&fields, obj, &format!("`{name}` answered {v}:"), true, &mut errs)
                }
                None => errs.push(format!("`{name}` answered {v}, not an object")),
            }
        }
    }
    for (op, _) in &answers {
        assert!(doc.ops.iter().any(|o| &o.op == op), "`{op}` is called but not documented");
    }

    // 4. The errors each key operation answers are the ones it documents.
    probe_key_states(&doc, &c, &mut errs).await;
    probe_opened_states(&doc, &c, &mut errs).await;

    // 3. The examples' requests, sent as they are: none is refused for
    // the shape of its params (an elided value such as `khe1:…` may be
    // refused for what it is; the master-key examples run last).
    let mut examples: Vec<(&str, &Value)> = doc
        .ops
        .iter()
        .flat_map(|o| o.examples.iter().filter(|e| e.get("op").is_some()).map(move |e| (o.op.as_str(), e)))
        .collect();
    examples.sort_by_key(|(op, _)| op.starts_with("admin_"));
    for (op, ex) in examples {
        let params = ex.get("params").cloned().unwrap_or(json!({}));
        if let Err(keyhaven::Error::Daemon { code: ErrorCode::BadRequest, message }) =
            c.call_raw(op, params).await
        {
            if ["unknown field", "invalid type", "missing field"].iter().any(|m| message.contains(m)) {
                errs.push(format!("the example {ex} does not parse: {message}"));
            }
        }
    }
    assert!(errs.is_empty(), "PROTOCOL.md §3 and the daemon disagree:\n{}", errs.join("\n"));
}
