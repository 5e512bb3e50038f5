//! Who may do what (docs/POLICY.md). The policy is the `[[policy.rules]]`
//! list of the daemon's config: each rule grants its principals some
//! permissions on some tenant/key patterns. A caller may do what the union
//! of the rules naming it grants; nothing else (default deny; root is not
//! special). Identity is the kernel's (see [`crate::identity`]).
//!
//! Every wire operation declares the permission it needs where it is
//! declared (`crate::ops`, [`Access`]); its handler asks the policy before
//! any store or HSM work, so a refusal never depends on whether a key
//! exists.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::identity::Caller;

/// A permission a rule can grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// `encrypt`.
    Encrypt,
    /// `decrypt` and `datakey_decrypt`.
    Decrypt,
    /// `datakey`: making new data keys.
    Datakey,
    /// `key_create`, `key_list` and the key lifecycle operations.
    KeyAdmin,
    /// `revoke`, `revoke_lift`, `revoke_list`, `destroy`.
    Revoke,
    /// Reading and verifying the audit log.
    AuditRead,
    /// Lifting a whole-system suspension (with `revoke`).
    BreakGlass,
    /// Administering the daemon itself: `admin_reload`.
    Admin,
    /// `mac`: making MAC tags under `hmac-sha256` keys.
    Mac,
    /// `mac_verify`: checking MAC tags.
    MacVerify,
    /// `sign`: signing with ECDSA keys.
    Sign,
    /// `public_key`: reading signing keys' public keys (grantable widely).
    PublicKey,
    /// `metrics`: reading the daemon's metrics.
    Metrics,
    /// `verify`: checking signatures in the daemon (the token).
    Verify,
    /// `key_import_params`, `key_import`: bringing key material of one's
    /// own (BYOK).
    Import,
    /// `alias_create`, `alias_update`, `alias_delete`, `alias_list`:
    /// managing key aliases (granted on the alias's and the key's names).
    Alias,
}

impl Permission {
    /// Every permission, in the order `whoami` shows them.
    pub const ALL: [Permission; 16] = [
        Permission::Encrypt,
        Permission::Decrypt,
        Permission::Datakey,
        Permission::KeyAdmin,
        Permission::Revoke,
        Permission::AuditRead,
        Permission::BreakGlass,
        Permission::Admin,
        Permission::Mac,
        Permission::MacVerify,
        Permission::Sign,
        Permission::PublicKey,
        Permission::Metrics,
        Permission::Verify,
        Permission::Import,
        Permission::Alias,
    ];

    /// The name used in the config and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Encrypt => "encrypt",
            Permission::Decrypt => "decrypt",
            Permission::Datakey => "datakey",
            Permission::KeyAdmin => "key-admin",
            Permission::Revoke => "revoke",
            Permission::AuditRead => "audit-read",
            Permission::BreakGlass => "break-glass",
            Permission::Admin => "admin",
            Permission::Mac => "mac",
            Permission::MacVerify => "mac-verify",
            Permission::Sign => "sign",
            Permission::PublicKey => "public-key",
            Permission::Metrics => "metrics",
            Permission::Verify => "verify",
            Permission::Import => "import",
            Permission::Alias => "alias",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.name() == s)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone who can connect (`hello`, `health`, `whoami`,
    /// `subscribe_revocations`).
    Open,
    /// This permission on the operation's target.
    Needs(Permission),
}

/// What an operation acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// One named key.
    Key {
        /// Tenant.
        tenant: &'a str,
        /// Key name.
        key: &'a str,
    },
    /// Every key of a tenant (e.g. `key_list` of one tenant).
    Tenant(&'a str),
    /// The whole daemon (e.g. `key_list` of all tenants, `admin_reload`).
    All,
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Key { tenant, key } => write!(f, "`{tenant}/{key}`"),
            Target::Tenant(t) => write!(f, "tenant `{t}`"),
            Target::All => f.write_str("every tenant"),
        }
    }
}

/// `[policy]` as written in the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The rules; none means nobody may do anything but `hello`, `health`
    /// and `whoami`.
    #[serde(default)]
    pub rules: Vec<RuleSection>,
}

/// One `[[policy.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// Optional name, shown by `whoami`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `user:NAME`, `uid:N`, `group:NAME`, `gid:N`.
    pub principals: Vec<Spanned<String>>,
    /// Permission names, or `*` for all.
    pub operations: Vec<Spanned<String>>,
    /// `TENANT/KEY` patterns (`*` matches any run of characters), or `*`.
    pub keys: Vec<Spanned<String>>,
}

impl RuleSection {
    /// A rule built in code (spans are empty).
    pub fn new(name: &str, principals: &[&str], operations: &[&str], keys: &[&str]) -> RuleSection {
        let spanned = |v: &[&str]| v.iter().map(|s| Spanned::new(0..0, s.to_string())).collect();
        RuleSection {
            name: Some(name.to_owned()),
            principals: spanned(principals),
            operations: spanned(operations),
            keys: spanned(keys),
        }
    }
}

/// A principal a rule names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// `user:NAME`.
    User(String),
    /// `uid:N`.
    Uid(u32),
    /// `group:NAME`.
    Group(String),
    /// `gid:N`.
    Gid(u32),
}

impl Principal {
    fn matches(&self, c: &Caller) -> bool {
        match self {
            Principal::User(n) => c.user.as_deref() == Some(n),
            Principal::Uid(u) => c.uid == *u,
            Principal::Group(n) => c.in_group(n),
            Principal::Gid(g) => c.in_gid(*g),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(n) => write!(f, "user:{n}"),
            Principal::Uid(u) => write!(f, "uid:{u}"),
            Principal::Group(n) => write!(f, "group:{n}"),
            Principal::Gid(g) => write!(f, "gid:{g}"),
        }
    }
}

/// A `TENANT/KEY` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    tenant: String,
    key: String,
}

impl Pattern {
    fn matches(&self, t: &Target) -> bool {
        match t {
            Target::Key { tenant, key } => glob(&self.tenant, tenant) && glob(&self.key, key),
            Target::Tenant(tenant) => glob(&self.tenant, tenant) && self.key == "*",
            Target::All => self.tenant == "*" && self.key == "*",
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.key)
    }
}

/// `*` matches any run of characters (names hold no `/`).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            back = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((bp, bn)) = back {
            pi = bp + 1;
            ni = bn + 1;
            back = Some((bp, bn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A compiled rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    name: Option<String>,
    principals: Vec<Principal>,
    permissions: u16,
    patterns: Vec<Pattern>,
}

/// The compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// What `whoami` shows for one rule that names the caller.
#[derive(Clone, Debug, Serialize)]
pub struct Grant {
    /// The rule's name, or `rule N` (from 1, in file order).
    pub rule: String,
    /// Permission names.
    pub operations: Vec<&'static str>,
    /// Patterns, `TENANT/KEY`.
    pub keys: Vec<String>,
}

/// The line of a byte offset in `text`, from 1.
fn line_of(text: &str, span: &Range<usize>) -> usize {
    text.get(..span.start).map_or(0, |t| t.bytes().filter(|&b| b == b'\n').count()) + 1
}

impl Policy {
    /// Compiles `[policy]`; `text` is the file it came from, for line
    /// numbers in errors ("line 12: unknown operation `decrpyt`").
    pub fn compile(section: &PolicySection, text: &str) -> Result<Policy, String> {
        let at = |s: &Spanned<String>, why: String| {
            if s.span().is_empty() {
                why
            } else {
                format!("line {}: {why}", line_of(text, &s.span()))
            }
        };
        let mut rules = Vec::new();
        for r in &section.rules {
            let mut principals = Vec::new();
            for p in &r.principals {
                principals.push(parse_principal(p.get_ref()).map_err(|e| at(p, e))?);
            }
            let mut permissions = 0u16;
            for o in &r.operations {
                if o.get_ref() == "*" {
                    permissions |= Permission::ALL.iter().fold(0, |a, p| a | p.bit());
                } else {
                    let p = Permission::parse(o.get_ref()).ok_or_else(|| {
                        at(
                            o,
                            format!(
                                "unknown operation `{}` (known: {}, or `*`)",
                                crate::text::printable(o.get_ref()),
                                Permission::ALL.map(Permission::name).join(", ")
                            ),
                        )
                    })?;
                    permissions |= p.bit();
                }
            }
            let mut patterns = Vec::new();
            for k in &r.keys {
                patterns.push(parse_pattern(k.get_ref()).map_err(|e| at(k, e))?);
            }
            rules.push(Rule { name: r.name.clone(), principals, permissions, patterns });
        }
        Ok(Policy { rules })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (nobody may do anything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `caller` holds `perm` on `target`.
    pub fn allows(&self, caller: &Caller, perm: Permission, target: &Target) -> bool {
        self.rules.iter().any(|r| {
            r.permissions & perm.bit() != 0
                && r.principals.iter().any(|p| p.matches(caller))
                && r.patterns.iter().any(|p| p.matches(target))
        })
    }

    /// The rules that name `caller`.
    pub fn grants(&self, caller: &Caller) -> Vec<Grant> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.principals.iter().any(|p| p.matches(caller)))
            .map(|(i, r)| Grant {
                rule: r.name.clone().unwrap_or_else(|| format!("rule {}", i + 1)),
                operations: Permission::ALL
                    .into_iter()
                    .filter(|p| r.permissions & p.bit() != 0)
                    .map(Permission::name)
                    .collect(),
                keys: r.patterns.iter().map(ToString::to_string).collect(),
            })
            .collect()
    }

    /// Names in `user:` and `group:` principals that the user database
    /// does not know now (worth a warning: such a rule matches nobody).
    pub fn unknown_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in self.rules.iter().flat_map(|r| &r.principals) {
            let known = match p {
                Principal::User(n) => nix::unistd::User::from_name(n).ok().flatten().is_some(),
                Principal::Group(n) => nix::unistd::Group::from_name(n).ok().flatten().is_some(),
                _ => true,
            };
            if !known && !out.contains(&p.to_string()) {
                out.push(p.to_string());
            }
        }
        out
    }
}

fn parse_principal(s: &str) -> Result<Principal, String> {
    let bad = || {
        format!(
            "principal `{}` must be `user:NAME`, `uid:N`, `group:NAME` or `gid:N`",
            crate::text::printable(s)
        )
    };
    let (kind, value) = s.split_once(':').ok_or_else(bad)?;
    if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control() || c == ':') {
        return Err(bad());
    }
    let number = || value.parse::<u32>().map_err(|_| bad());
    Ok(match kind {
        "user" => Principal::User(value.to_owned()),
        "uid" => Principal::Uid(number()?),
        "group" => Principal::Group(value.to_owned()),
        "gid" => Principal::Gid(number()?),
        _ => return Err(bad()),
    })
}

fn parse_pattern(s: &str) -> Result<Pattern, String> {
    let bad = || {
        format!(
            "key pattern `{}` must be `*` or `TENANT/KEY`, each part of a-z, 0-9, `-`, `_` and `*`",
            crate::text::printable(s)
        )
    };
    let (tenant, key) = if s == "*" { ("*", "*") } else { s.split_once('/').ok_or_else(bad)? };
    let ok = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_*".contains(&b))
    };
    if !ok(tenant) || !ok(key) {
        return Err(bad());
    }
    Ok(Pattern { tenant: tenant.to_owned(), key: key.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::GroupId;

    fn caller(uid: u32, user: &str, groups: &[(u32, &str)]) -> Caller {
        Caller {
            uid,
            gid: groups[0].0,
            pid: None,
            user: Some(user.into()),
            groups: groups.iter().map(|(g, n)| GroupId { gid: *g, name: Some((*n).into()) }).collect(),
            exe: None,
            cgroup: None,
        }
    }

    fn policy(text: &str) -> Result<Policy, String> {
        #[derive(Deserialize)]
        struct F {
            policy: PolicySection,
        }
        let f: F = toml::from_str(text).map_err(|e| e.to_string())?;
        Policy::compile(&f.policy, text)
    }

    #[test]
    fn globs() {
        for (p, n, m) in [
            ("*", "acme", true),
            ("acme", "acme", true),
            ("acme", "acme2", false),
            ("ac*", "acme", true),
            ("*me", "acme", true),
            ("a*m*e", "axxmyye", true),
            ("a*m*e", "axxmyy", false),
            ("**", "", true),
            ("pii", "pii-x", false),
        ] {
            assert_eq!(glob(p, n), m, "{p} vs {n}");
        }
    }

    #[test]
    fn rules_grant_by_user_uid_group_and_gid_on_patterns() {
        let p = policy(
            r#"
[[policy.rules]]
principals = ["user:alice", "uid:2000"]
operations = ["encrypt", "decrypt"]
keys = ["acme/*"]

[[policy.rules]]
principals = ["group:billing", "gid:3000"]
operations = ["datakey"]
keys = ["*/pii"]

[[policy.rules]]
name = "auditors"
principals = ["group:audit"]
operations = ["audit-read"]
keys = ["*"]
"#,
        )
        .unwrap();
        let alice = caller(1000, "alice", &[(1000, "alice")]);
        let bob = caller(2000, "bob", &[(2000, "bob"), (3001, "billing")]);
        let carol = caller(1002, "carol", &[(1002, "carol"), (3000, "x"), (4000, "audit")]);
        let root = caller(0, "root", &[(0, "root")]);
        let k = |t, k| Target::Key { tenant: t, key: k };
        assert!(p.allows(&alice, Permission::Encrypt, &k("acme", "pii")));
        assert!(p.allows(&alice, Permission::Decrypt, &k("acme", "smtp")));
        assert!(!p.allows(&alice, Permission::Encrypt, &k("beta", "pii")));
        assert!(!p.allows(&alice, Permission::Datakey, &k("acme", "pii")));
        assert!(p.allows(&bob, Permission::Encrypt, &k("acme", "pii")), "uid:2000");
        assert!(p.allows(&bob, Permission::Datakey, &k("beta", "pii")), "group:billing");
        assert!(!p.allows(&bob, Permission::Datakey, &k("beta", "smtp")));
        assert!(p.allows(&carol, Permission::Datakey, &k("zeta", "pii")), "gid:3000");
        assert!(p.allows(&carol, Permission::AuditRead, &Target::All));
        assert!(p.allows(&carol, Permission::AuditRead, &Target::Tenant("acme")));
        assert!(!p.allows(&alice, Permission::AuditRead, &Target::Tenant("acme")));
        assert!(p.allows(&alice, Permission::Encrypt, &Target::Tenant("acme")), "acme/* covers the tenant");
        assert!(!p.allows(&alice, Permission::Encrypt, &Target::All));
        assert!(!p.allows(&bob, Permission::Datakey, &Target::Tenant("acme")), "*/pii is not the tenant");
        for perm in Permission::ALL {
            assert!(!p.allows(&root, perm, &k("acme", "pii")), "root gets nothing ungranted");
        }
        let g = p.grants(&carol);
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].rule, "auditors");
        assert_eq!(g[0].rule, "rule 2");
    }

    #[test]
    fn star_grants_every_permission() {
        let p =
            policy("[[policy.rules]]\nprincipals=[\"uid:5\"]\noperations=[\"*\"]\nkeys=[\"*\"]\n").unwrap();
        let c = caller(5, "x", &[(5, "x")]);
        for perm in Permission::ALL {
            assert!(p.allows(&c, perm, &Target::All));
        }
        assert!(Policy::default().grants(&c).is_empty());
    }

    #[test]
    fn errors_name_the_line_and_the_reason() {
        let text = "[[policy.rules]]\nprincipals = [\"uid:1\"]\noperations = [\"encrypt\",\n  \"decrpyt\"]\nkeys = [\"*\"]\n";
        let e = policy(text).unwrap_err();
        assert!(e.starts_with("line 4: unknown operation `decrpyt`"), "{e}");
        let e =
            policy("[[policy.rules]]\nprincipals = [\"someone\"]\noperations = []\nkeys = []\n").unwrap_err();
        assert!(e.starts_with("line 2: principal `someone`"), "{e}");
        let e =
            policy("[[policy.rules]]\nprincipals = []\noperations = []\nkeys = [\"acme\"]\n").unwrap_err();
        assert!(e.starts_with("line 4: key pattern `acme`"), "{e}");
        for bad in ["uid:x", "gid:-1", "user:", "host:a", "user:a b"] {
            assert!(parse_principal(bad).is_err(), "{bad}");
        }
        for bad in ["acme/", "/pii", "a/b/c", "ACME/pii", "a b/c"] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }
}
