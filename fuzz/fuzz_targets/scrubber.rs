//! Body scrubber: for any body and any chunking, the token never survives,
//! and chunking does not change the result.
#![no_main]
use arcgis_app_proxy::scrub::Scrubber;
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "TOKENabc.def-ghi_jkl=";

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (cuts, body) = data.split_at((data.len() / 8).max(1));
    // Splice the token into the body at positions taken from the input,
    // from the last position back so no copy lands inside another (a body
    // that nests a token inside a copy of the same token re-forms it when
    // the inner one is removed; only a party that knows the token can write
    // that, see SECURITY.md).
    let mut input = body.to_vec();
    let mut positions: Vec<usize> = cuts.iter().take(4).map(|c| *c as usize % (body.len() + 1)).collect();
    positions.sort_unstable();
    for at in positions.into_iter().rev() {
        input.splice(at..at, TOKEN.bytes());
    }
    let whole = Scrubber::new(&[TOKEN], &[]).unwrap().scrub_all(&input);
    let mut s = Scrubber::new(&[TOKEN], &[]).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts.iter().cycle() {
        if at >= input.len() {
            break;
        }
        let end = (at + 1 + *c as usize % 97).min(input.len());
        out.extend(s.push(&input[at..end]));
        at = end;
    }
    out.extend(s.finish());
    assert_eq!(out, whole, "chunking changed the result");
    // The token may only survive if the body itself re-forms it around a
    // removal, which needs the token's bytes in the body; with the token
    // spliced in whole, no copy of it may remain where it was inserted.
    if !body.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()) && !body.contains(&b'T') {
        assert!(!out.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()), "token survived");
    }
});
