//! `keyhavend dev`: a complete local install in one folder, for trying
//! Keyhaven and for tests. The first run creates a SoftHSM2 token (with its
//! own SOFTHSM2_CONF), random PINs in 0600 files, a config, the master key
//! and the store; later runs reuse them.
//!
//! ```text
//! DIR/softhsm2.conf   DIR/tokens/   DIR/pin   DIR/so-pin
//! DIR/keyhaven.toml   DIR/store/    DIR/keyhaven.sock
//! ```
//!
//! With `--postgres URL` the store is that database (docs/CLUSTER.md): the
//! connection string goes into `DIR/postgres-url` (0600) and `DIR/store/`
//! keeps only the daemon's local notes.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::{AuditSection, Config, HsmSection, Limits, Mode, StoreBackend, StoreSection};
use crate::hsm::token;
use crate::policy::{PolicySection, RuleSection};
use crate::secret::Pin;
use crate::store::Store;

/// Token label of dev installs.
pub const DEV_TOKEN_LABEL: &str = "keyhaven-dev";

/// The file of a dev install's PostgreSQL connection string.
pub const POSTGRES_URL_FILE: &str = "postgres-url";

/// Where SoftHSM2's module is on common distributions.
const SOFTHSM_MODULES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The SoftHSM2 module: `$KEYHAVEN_SOFTHSM_MODULE`, else the first that exists.
pub fn find_softhsm_module() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEYHAVEN_SOFTHSM_MODULE") {
        return Some(PathBuf::from(p));
    }
    SOFTHSM_MODULES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Makes sure `dir` holds a dev install and returns its config path, and
/// the store when this run created it (still open). `postgres`: the
/// connection string of the database to keep the store in.
pub fn prepare(dir: &Path, postgres: Option<&str>) -> anyhow::Result<(PathBuf, Option<Store>)> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join("keyhaven.toml");
    if config_path.exists() {
        let url_file = dir.join(POSTGRES_URL_FILE);
        match postgres {
            Some(_) if !url_file.exists() => bail!(
                "{} is a dev install on sled; --postgres applies to a new folder only (docs/CLUSTER.md)",
                dir.display()
            ),
            Some(url) if fs::read_to_string(&url_file)?.trim() != url.trim() => bail!(
                "{} is a dev install on another PostgreSQL database (see {}); --postgres applies to a new \
                 folder only",
                dir.display(),
                url_file.display()
            ),
            _ => return Ok((config_path, None)),
        }
    }
    let tokens = dir.join("tokens");
    if tokens.exists() && fs::read_dir(&tokens)?.next().is_some() {
        bail!(
            "{} holds a token but no keyhaven.toml: an earlier `keyhavend dev` stopped half way; remove {} and run again",
            tokens.display(),
            dir.display()
        );
    }
    let module = find_softhsm_module().context(
        "SoftHSM2 is not installed (no libsofthsm2.so found); install it with `apt-get install softhsm2`, \
         or set KEYHAVEN_SOFTHSM_MODULE to its path",
    )?;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&tokens)?;
    let softhsm_conf = dir.join("softhsm2.conf");
    write_private(
        &softhsm_conf,
        &format!(
            "# SoftHSM2 configuration of this keyhavend dev install\n\
             directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )?;
    std::env::set_var("SOFTHSM2_CONF", &softhsm_conf);

    let pin = Pin::new(&random_hex(16)?);
    let so_pin = Pin::new(&random_hex(16)?);
    write_private(&dir.join("pin"), &format!("{}\n", pin.expose()))?;
    write_private(&dir.join("so-pin"), &format!("{}\n", so_pin.expose()))?;
    let pkcs11 = token::load_module(&module.display().to_string())?;
    token::init_token(&pkcs11, DEV_TOKEN_LABEL, &so_pin, &pin).context("creating the SoftHSM2 token")?;
    drop(pkcs11);

    let config = Config {
        mode: Mode::Dev,
        socket: dir.join("keyhaven.sock"),
        socket_mode: 0o660,
        socket_group: None,
        store: match postgres {
            None => StoreSection::sled(dir.join("store")),
            Some(url) => {
                write_private(&dir.join(POSTGRES_URL_FILE), &format!("{}\n", url.trim()))?;
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("store"))?;
                StoreSection {
                    backend: StoreBackend::Postgres,
                    url_file: Some(dir.join(POSTGRES_URL_FILE)),
                    ..StoreSection::sled(dir.join("store"))
                }
            }
        },
        hsm: HsmSection {
            module,
            token_label: DEV_TOKEN_LABEL.into(),
            pin_file: Some(dir.join("pin")),
            pin_env: None,
            pin_credential: None,
            pin: None,
            allow_softhsm: false,
            master_key_label: "keyhaven-mk".into(),
            audit_key_label: "keyhaven-audit".into(),
            workers: crate::hsm::Workers::Fixed(1),
            inline: false,
            queue_depth: 4096,
            loaded_keys: crate::hsm::DEFAULT_LOADED_KEYS,
            softhsm2_conf: Some(softhsm_conf),
        },
        limits: Limits::default(),
        audit: AuditSection::default(),
        lifecycle: Default::default(),
        // Several dev nodes share one host: each is named after its folder.
        cluster: crate::config::ClusterSection { node: postgres.map(|_| node_name_of(&dir)), lease: None },
        metrics: Default::default(),
        // The quick start: whoever ran `keyhavend dev` may do everything.
        policy: PolicySection {
            rules: vec![RuleSection::new(
                "dev: the user who ran `keyhavend dev`",
                &[&format!("uid:{}", nix::unistd::getuid())],
                &["*"],
                &["*"],
            )],
        },
        access: Default::default(),
        source: None,
    };
    let text = format!(
        "# Written by `keyhavend dev`. A development install: its token is a SoftHSM2\n\
         # token in this folder and its PIN is in a file next to it.\n{}",
        toml::to_string(&config)?
    );
    let tmp = dir.join("keyhaven.toml.tmp");
    write_private(&tmp, &text)?;
    let store = crate::init::initialise(&config)?;
    // The config appears last, so that a run that fails half way is noticed.
    fs::rename(&tmp, &config_path)?;
    Ok((config_path, Some(store)))
}

/// A node name made of a folder's name: lowercased, other characters
/// turned into `-`, at most 63 bytes.
pub fn node_name_of(dir: &Path) -> String {
    let base = dir.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let name: String = base
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '-' })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(63)
        .collect();
    if name.is_empty() {
        "node".into()
    } else {
        name
    }
}

/// `keyhavend dev --dir DIR --join OTHER`: another node of OTHER's
/// cluster (a dev install on PostgreSQL), sharing its token, PIN and
/// database, with its own socket, local notes and node name (`node`, or
/// DIR's name). Returns its config path; a later run reuses it.
pub fn join(dir: &Path, other: &Path, node: Option<&str>) -> anyhow::Result<PathBuf> {
    let other_config = other.join("keyhaven.toml");
    let theirs = Config::load(&other_config).with_context(|| {
        format!("--join {}: no dev install there ({})", other.display(), other_config.display())
    })?;
    if theirs.store.backend != StoreBackend::Postgres {
        bail!(
            "--join {}: that dev install keeps its store in sled; only one on PostgreSQL (`keyhavend dev --postgres URL`) \
             can have other nodes (docs/CLUSTER.md)",
            other.display()
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir == other.canonicalize()? {
        bail!("--join names the folder of this node itself; give another --dir");
    }
    let config_path = dir.join("keyhaven.toml");
    if config_path.exists() {
        return Ok(config_path);
    }
    let name = node.map_or_else(|| node_name_of(&dir), str::to_owned);
    keyhaven::names::validate_name("cluster node", &name)?;
    if theirs.cluster.node_name().ok().as_deref() == Some(name.as_str()) {
        bail!("node name `{name}` is the joined node's own; give another --dir or --node");
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("store"))?;
    let mut config = theirs;
    config.socket = dir.join("keyhaven.sock");
    config.store.path = dir.join("store");
    config.cluster = crate::config::ClusterSection { node: Some(name), lease: config.cluster.lease.clone() };
    config.source = None;
    let text = format!(
        "# Written by `keyhavend dev --join {}`: another node of its cluster, sharing\n\
         # its SoftHSM2 token, PIN and PostgreSQL database.\n{}",
        other.display(),
        toml::to_string(&config)?
    );
    write_private(&config_path, &text)?;
    Ok(config_path)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = zeroize::Zeroizing::new(vec![0u8; bytes]);
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
