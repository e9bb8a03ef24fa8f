//! Reading an upstream HTTP/1.1 answer (head, then a body framed by length,
//! chunks or close): never panics, and the outcome does not depend on how
//! reads cut the bytes.
#![no_main]
use arcgis_app_proxy::upstream::read_answer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let whole = read_answer(wire, usize::MAX, head_request);
    for piece in [1, 7, usize::from(flags >> 1) + 1] {
        assert_eq!(read_answer(wire, piece, head_request), whole, "pieces of {piece}");
    }
});
