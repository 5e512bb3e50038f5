//! A key's description and tags (PROTOCOL.md §3.3, §3.19): free text and
//! `name=value` pairs an operator puts on a key to say what it is for and
//! to find it again (`key_list` filters on tags). They are not secret, go
//! into audit records as they are, and are bounded here so that a key
//! record, a list page and an audit record stay small and printable.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::text::printable;

/// Longest description, in bytes of UTF-8.
pub const MAX_DESCRIPTION_LEN: usize = 256;
/// Most tags on one key.
pub const MAX_TAGS: usize = 50;
/// Longest tag name, in bytes.
pub const MAX_TAG_NAME_LEN: usize = 64;
/// Longest tag value, in bytes of UTF-8.
pub const MAX_TAG_VALUE_LEN: usize = 256;

/// A key's tags, sorted by name.
pub type Tags = BTreeMap<String, String>;

/// Checks a description: at most 256 bytes, no control characters (it is
/// printed on terminals and in logs). Empty means none.
pub fn check_description(field: &str, text: &str) -> Result<(), Error> {
    if text.len() > MAX_DESCRIPTION_LEN {
        return Err(Error::BadRequest(format!(
            "field `{field}`: {} bytes; a description takes at most {MAX_DESCRIPTION_LEN}",
            text.len()
        )));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(Error::BadRequest(format!(
            "field `{field}`: control character {} is not allowed in a description",
            c.escape_unicode()
        )));
    }
    Ok(())
}

/// Checks a tag name: 1 to 64 characters of `A-Z a-z 0-9 . _ : / -`,
/// starting with a letter or a digit (so `k=v` on a command line splits at
/// the first `=`).
pub fn check_tag_name(field: &str, name: &str) -> Result<(), Error> {
    let bad = |why: String| {
        Err(Error::BadRequest(format!("field `{field}`: tag name `{}` {why}", printable(name))))
    };
    if name.is_empty() || name.len() > MAX_TAG_NAME_LEN {
        return bad(format!("is {} bytes; a tag name takes 1 to {MAX_TAG_NAME_LEN}", name.len()));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or a digit".into());
    }
    if let Some(c) =
        name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')))
    {
        return bad(format!("holds {c:?}; a tag name takes letters, digits and . _ : / -"));
    }
    Ok(())
}

/// Checks a tag value: at most 256 bytes (empty is allowed), no control
/// characters.
pub fn check_tag_value(field: &str, name: &str, value: &str) -> Result<(), Error> {
    if value.len() > MAX_TAG_VALUE_LEN {
        return Err(Error::BadRequest(format!(
            "field `{field}`: the value of tag `{name}` is {} bytes; a tag value takes at most {MAX_TAG_VALUE_LEN}",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::BadRequest(format!(
            "field `{field}`: control character {} is not allowed in the value of tag `{name}`",
            c.escape_unicode()
        )));
    }
    Ok(())
}

/// Checks a set of tags given in `field` (each name and value).
pub fn check_tags(field: &str, tags: &Tags) -> Result<(), Error> {
    if tags.len() > MAX_TAGS {
        return Err(Error::BadRequest(format!(
            "field `{field}`: {} tags; a key holds at most {MAX_TAGS}",
            tags.len()
        )));
    }
    for (name, value) in tags {
        check_tag_name(field, name)?;
        check_tag_value(field, name, value)?;
    }
    Ok(())
}

/// Whether `tags` has every pair of `wanted` (a `key_list` filter).
pub fn matches(tags: &Tags, wanted: &Tags) -> bool {
    wanted.iter().all(|(k, v)| tags.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn good_labels_pass() {
        check_description("description", "").unwrap();
        check_description("description", &"é".repeat(128)).unwrap();
        check_tags(
            "tags",
            &tags(&[("team", "billing"), ("cost-center", ""), ("app.kubernetes.io/name", "x y")]),
        )
        .unwrap();
        check_tags("tags", &(0..50).map(|i| (format!("t{i}"), "v".into())).collect()).unwrap();
    }

    #[test]
    fn bad_labels_are_refused_naming_the_field() {
        for d in ["a\nb", "\u{1b}[31m", &"x".repeat(257)] {
            let e = check_description("description", d).unwrap_err().to_string();
            assert!(e.contains("field `description`"), "{e}");
        }
        for t in [
            tags(&[("", "v")]),
            tags(&[("-a", "v")]),
            tags(&[("a b", "v")]),
            tags(&[("a=b", "v")]),
            tags(&[(&"x".repeat(65), "v")]),
            tags(&[("a", "line\nbreak")]),
            tags(&[("a", &"v".repeat(257))]),
            (0..51).map(|i| (format!("t{i}"), "v".into())).collect(),
        ] {
            let e = check_tags("set_tags", &t).unwrap_err().to_string();
            assert!(e.contains("field `set_tags`"), "{t:?}: {e}");
        }
    }

    #[test]
    fn a_filter_needs_every_pair() {
        let have = tags(&[("team", "billing"), ("env", "prod")]);
        assert!(matches(&have, &tags(&[])));
        assert!(matches(&have, &tags(&[("env", "prod")])));
        assert!(!matches(&have, &tags(&[("env", "prod"), ("team", "search")])));
        assert!(!matches(&have, &tags(&[("owner", "")])));
    }
}
