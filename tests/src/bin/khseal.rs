//! The Rust side of the cross-language sealing tests
//! (clients/python/tests/test_cross.py): seals and opens `khs1:` records
//! with the Rust crate's `Sealer`, which the `keyhaven` CLI does not offer
//! for records (it seals streams only).
//!
//! ```text
//! khseal SOCKET seal TENANT/KEY [KEY=VALUE...]   plaintext on stdin, one `khs1:` line on stdout
//! khseal SOCKET open [KEY=VALUE...]              `khs1:` text on stdin, plaintext on stdout
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use keyhaven::blocking::Sealer;
use keyhaven::cache::{OpenLimits, SealLimits};
use keyhaven::seal::{sealed_from_text, sealed_to_text};
use keyhaven::{EncryptionContext, Error, KeyPath};

fn run(args: &[String]) -> Result<(), Error> {
    let usage = || {
        Error::Config("usage: khseal SOCKET seal TENANT/KEY [K=V...] | khseal SOCKET open [K=V...]".into())
    };
    let (socket, cmd) = match args {
        [socket, cmd, ..] => (socket, cmd.as_str()),
        _ => return Err(usage()),
    };
    let sealer = Sealer::connect(
        socket,
        SealLimits::new(Duration::from_secs(60), 1000, 1 << 20)?,
        OpenLimits::new(Duration::from_secs(60), 100)?,
    )?;
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let mut out = std::io::stdout();
    match cmd {
        "seal" => {
            let key: KeyPath = args.get(2).ok_or_else(usage)?.parse()?;
            let ctx = EncryptionContext::from_pairs(&args[3..])?;
            writeln!(out, "{}", sealed_to_text(&sealer.seal(&key, &input, &ctx)?))?;
        }
        "open" => {
            let ctx = EncryptionContext::from_pairs(&args[2..])?;
            let text = String::from_utf8(input).map_err(|_| Error::Envelope("not UTF-8".into()))?;
            out.write_all(&sealer.open(&sealed_from_text(&text)?, &ctx)?)?;
        }
        _ => return Err(usage()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("khseal: {e}");
            ExitCode::FAILURE
        }
    }
}
