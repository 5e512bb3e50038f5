//! Text that came from a client, made safe to put into a message, a log
//! line or an audit record: shortened, escaped, and with any quoted value
//! cut out (it may be a secret sent in the wrong field). Every module that
//! names hostile input uses these, so they sit below all of them.

/// Shortens hostile input before it goes into a message.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// serde quotes a mistyped string value in its message (`invalid type:
/// string "…"`); that value might be a secret sent in the wrong field, so
/// it is cut out.
pub fn scrub(msg: &str) -> String {
    match (msg.find("string \""), msg.rfind("\", expected")) {
        (Some(a), Some(b)) if b > a + 8 => format!("{}string \"…{}", &msg[..a], &msg[b..]),
        _ => msg.to_owned(),
    }
}

/// What is wrong with a request or its params, for an error message
/// (PROTOCOL.md §4): the field at fault is named, names taken from the
/// request (unknown fields, context keys) are shortened and escaped, a
/// mistyped string value is cut out (it may be a secret sent in the wrong
/// field), and for a type error the position, which says nothing more than
/// the field, is left off.
pub fn describe(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    use serde_path_to_error::Segment;
    let mut path: Vec<String> = e
        .path()
        .iter()
        .map(|s| match s {
            Segment::Map { key } => printable(key),
            Segment::Enum { variant } => printable(variant),
            Segment::Seq { index } => index.to_string(),
            Segment::Unknown => "?".to_owned(),
        })
        .collect();
    let inner = e.inner();
    let mut msg = inner.to_string();
    if inner.is_data() {
        let at = format!(" at line {} column {}", inner.line(), inner.column());
        if msg.ends_with(&at) {
            msg.truncate(msg.len() - at.len());
        }
    }
    // serde quotes an unknown field name raw, and it is the last segment of
    // the path: show it escaped, once.
    if let Some(Segment::Map { key }) = e.path().iter().next_back() {
        if let Some(rest) = msg.strip_prefix(&format!("unknown field `{key}`")) {
            msg = format!("unknown field `{}`{rest}", printable(key));
            path.pop();
        }
    }
    let msg = surrogate(&scrub(&msg));
    if path.is_empty() {
        msg
    } else {
        format!("field `{}`: {msg}", path.join("."))
    }
}

/// serde_json says "unexpected end of hex escape" or "lone leading
/// surrogate" for a `\uD800`-style escape without its pair: name the real
/// problem.
pub fn surrogate(msg: &str) -> String {
    if msg.contains("hex escape") || msg.contains("surrogate") {
        let at = msg.find(" at line ").map(|i| &msg[i..]).unwrap_or("");
        format!(
            "a lone UTF-16 surrogate escape (\\uD800 to \\uDFFF without its pair) is not a character: JSON strings \
             must be Unicode{at}"
        )
    } else {
        msg.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_surrogate_is_named() {
        for text in
            [r#"{"k":"\ud800"}"#, r#"{"k":"\ud800x"}"#, r#"{"k":"\udc00"}"#, r#"{"k":"\ud800\u0041"}"#]
        {
            let mut de = serde_json::Deserializer::from_str(text);
            let e =
                serde_path_to_error::deserialize::<_, std::collections::BTreeMap<String, String>>(&mut de)
                    .unwrap_err();
            let said = describe(&e);
            assert!(said.contains("lone UTF-16 surrogate"), "{text}: {said}");
        }
    }

    #[test]
    fn scrub_cuts_quoted_values() {
        let e = serde_json::from_str::<keyhaven::wire::Datakey>(
            r#"{"tenant":"a","key":"b","include_plaintext":"hunter2"}"#,
        )
        .unwrap_err();
        let s = scrub(&e.to_string());
        assert!(!s.contains("hunter2") && s.contains("expected"), "{s}");
    }

    #[test]
    fn printable_shortens_and_escapes() {
        let long = "x".repeat(100);
        assert_eq!(printable(&long).chars().count(), 65);
        assert_eq!(printable("a\nb"), "a\\nb");
    }
}
