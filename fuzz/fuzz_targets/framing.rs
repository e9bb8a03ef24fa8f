//! HTTP/1 framing guard: never panics; with any chunking it produces the same
//! output; a head with both Content-Length and Transfer-Encoding is never
//! passed on.
#![no_main]
use arcgis_app_proxy::http1::guard::Framing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut whole = Framing::new(4096);
    let mut a = Vec::new();
    whole.feed(data, &mut a);
    let mut split = Framing::new(4096);
    let mut b = Vec::new();
    for piece in data.chunks(7) {
        split.feed(piece, &mut b);
    }
    assert_eq!(a, b);
    assert_eq!(whole.poisoned(), split.poisoned());
});
