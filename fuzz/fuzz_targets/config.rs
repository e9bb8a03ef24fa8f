//! Config loading: any text is either a config or a list of problems; the
//! secret value never appears in the problems.
#![no_main]
use arcgis_app_proxy::config::{Config, Env};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        Some("FUZZ-SECRET-VALUE".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::from_toml(text, Path::new("fuzz.toml"), Path::new("/nonexistent"), &NoEnv) {
        assert!(!e.to_string().contains("FUZZ-SECRET-VALUE"));
    }
});
