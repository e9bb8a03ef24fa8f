//! Referer/Origin matching: what is accepted parses to a host under an entry.
#![no_main]
use arcgis_app_proxy::policy::referer::RefererPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let entries: Vec<String> = ["https://*.example.org", "https://app.example.com", "http://localhost:*"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = RefererPolicy::compile(&entries, false).unwrap();
    if p.allows(data) {
        let s = std::str::from_utf8(data).expect("accepted values are UTF-8");
        let u = url::Url::parse(s).expect("accepted values parse");
        let h = u.host_str().unwrap();
        assert!(
            h == "example.org" || h.ends_with(".example.org") || h == "app.example.com" || h == "localhost",
            "{s:?} accepted with host {h}"
        );
    }
    // Entries themselves are input too: compiling must never panic.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = RefererPolicy::compile(&[s.to_string()], false);
    }
});
