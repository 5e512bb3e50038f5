//! The daemon's TOML configuration: any text gives a config or a typed error
//! naming the problem, never a panic.
#![no_main]

use keyhavend::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Config::parse(text, std::path::Path::new("/etc/keyhaven/keyhaven.toml"));
});
