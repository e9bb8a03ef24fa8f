//! Path and target-URL safety: the checks that keep a request inside its route.
//!
//! Raw input is refused before parsing when it carries what a parser might
//! quietly reinterpret (encoded `/` or `\`, backslashes, NUL, control bytes);
//! what remains goes through the WHATWG URL parser, which resolves `.`/`..`
//! (also as `%2e`), lower-cases and punycodes hosts, canonicalises IPv4 forms
//! and drops default ports. Routing then compares only that normalised form.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;
use url::Url;

/// A request path or target that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `/proxy?` with nothing after it.
    #[error("missing target URL")]
    MissingTarget,
    /// The target is not an absolute http(s) URL with a host.
    #[error("malformed target URL")]
    MalformedTarget,
    /// `user:pass@` in a target.
    #[error("userinfo in target URL")]
    Userinfo,
    /// `%2F`, `%5C`, `\`, `%00` or control bytes in a path.
    #[error("forbidden character in path")]
    ForbiddenCharacter,
    /// A path that does not start with `/`.
    #[error("bad path")]
    BadPath,
    /// `GET http://host/… HTTP/1.1`: a forward-proxy request, not for us.
    #[error("absolute-form request target")]
    AbsoluteForm,
}

impl PathError {
    /// Client-facing message.
    pub fn message(&self) -> &'static str {
        match self {
            PathError::MissingTarget => "Missing target URL.",
            PathError::MalformedTarget => "Malformed target URL.",
            PathError::Userinfo => "User information is not allowed in the target URL.",
            PathError::ForbiddenCharacter => "Forbidden character in path.",
            PathError::BadPath => "Bad path.",
            PathError::AbsoluteForm => "Absolute-form request targets are not accepted.",
        }
    }
}

/// True for bytes no path may carry, raw or percent-encoded.
fn has_forbidden(path: &str) -> bool {
    if path.bytes().any(|b| b == b'\\' || b <= b' ' || b == 0x7f) {
        return true;
    }
    let bytes = path.as_bytes();
    bytes.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_uppercase()),
                (b'2', b'F') | (b'5', b'C') | (b'0', b'0')
            )
    })
}

/// True for a path the URL parser would return unchanged: only RFC 3986
/// path characters (no `%` escapes) and no `.`/`..` segments. Most request
/// paths are like this and skip the parser.
fn already_normal(raw: &str) -> bool {
    raw.bytes().all(|b| PATH_PLAIN[usize::from(b)]) && !has_dot_segment(raw.as_bytes())
}

/// RFC 3986 path characters other than `%`, as a lookup table.
static PATH_PLAIN: [bool; 256] = ascii_set(b"/-._~!$&'()*+,;=:@");

/// A byte-lookup table holding ASCII letters, digits and `extra`: one
/// index per byte instead of a chain of comparisons in hot scans.
const fn ascii_set(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 128 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// True when a `/`-separated path has a `.` or `..` segment.
fn has_dot_segment(path: &[u8]) -> bool {
    // Most paths have no `.` at all: one memchr instead of the segment walk.
    memchr::memchr(b'.', path).is_some()
        && path
            .split(|b| *b == b'/')
            .any(|seg| seg == b"." || seg == b"..")
}

/// Normalises a mounted request path (`/basemaps/a/../b`) to its canonical
/// form (`/basemaps/b`), refusing forbidden characters first.
pub fn normalise_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::BadPath);
    }
    if already_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    normalise_path_with_parser(raw).map(Cow::Owned)
}

/// [`normalise_path`] without the fast path.
fn normalise_path_with_parser(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::BadPath);
    }
    if has_forbidden(raw) {
        return Err(PathError::ForbiddenCharacter);
    }
    let mut url = Url::parse("http://n/").expect("static URL parses");
    url.set_path(raw);
    let path = url.path();
    // A second look after normalisation: the parser must not have produced
    // anything the raw check would refuse.
    if has_forbidden(path) {
        return Err(PathError::ForbiddenCharacter);
    }
    Ok(path.to_string())
}

/// Parses and normalises an Esri proxy-form target (`https://host/path?q`).
///
/// Schemes other than http(s) parse fine and are left for routing to refuse
/// with 403, like any other URL that no route covers.
pub fn parse_target(raw: &str) -> Result<Url, PathError> {
    if raw.is_empty() {
        return Err(PathError::MissingTarget);
    }
    if raw.bytes().any(|b| b <= b' ' || b == 0x7f) || contains_ci(raw, "%00") {
        return Err(PathError::ForbiddenCharacter);
    }
    let (before_query, _) = raw.split_once('?').unwrap_or((raw, ""));
    let before_query = before_query.split('#').next().unwrap_or("");
    // The part after the authority is the path; backslashes anywhere before
    // the query would be read as slashes by the parser.
    if before_query.contains('\\') {
        return Err(PathError::ForbiddenCharacter);
    }
    let Some((scheme, rest)) = before_query.split_once("://") else {
        return Err(PathError::MalformedTarget);
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        || rest.starts_with('/')
    {
        return Err(PathError::MalformedTarget);
    }
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    if has_forbidden(path) {
        return Err(PathError::ForbiddenCharacter);
    }
    let url = Url::parse(raw).map_err(|_| PathError::MalformedTarget)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(PathError::Userinfo);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(PathError::MalformedTarget);
    }
    if has_forbidden(url.path()) {
        return Err(PathError::ForbiddenCharacter);
    }
    Ok(url)
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// False when no parameter of `query` can be named any of `names`: every
/// key is plain (no `%` or `+` to decode) and none equals a name, ignoring
/// case. A byte scan that lets most queries skip the decoding comparison.
fn may_name_any(query: &[u8], names: &[&str]) -> bool {
    let named = |key: &[u8]| names.iter().any(|n| key.eq_ignore_ascii_case(n.as_bytes()));
    // One pass: `key_start` is where the current pair began, `in_key`
    // whether its `=` is still to come.
    let mut key_start = 0;
    let mut in_key = true;
    for (i, &b) in query.iter().enumerate() {
        match b {
            b'&' => {
                if in_key && named(&query[key_start..i]) {
                    return true;
                }
                key_start = i + 1;
                in_key = true;
            }
            b'=' if in_key => {
                if named(&query[key_start..i]) {
                    return true;
                }
                in_key = false;
            }
            b'%' | b'+' if in_key => return true,
            _ => {}
        }
    }
    in_key && named(&query[key_start..])
}

/// True when a query or form parameter name is `name`, compared after
/// percent-decoding and case-insensitively (ArcGIS treats names that way).
pub fn param_is(pair: &str, name: &str) -> bool {
    let key = memchr::memchr(b'=', pair.as_bytes()).map_or(pair, |i| &pair[..i]);
    if key.len() < name.len() {
        return false;
    }
    let decoded: Cow<'_, str> = if key.bytes().any(|b| b == b'%' || b == b'+') {
        let spaced = key.replace('+', " ");
        Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
    } else {
        Cow::Borrowed(key)
    };
    decoded.eq_ignore_ascii_case(name)
}

/// Removes every parameter named in `names` from an `a=1&b=2` string, keeping
/// the others byte for byte.
pub fn strip_params<'a>(query: &'a str, names: &[&str]) -> Cow<'a, str> {
    if !may_name_any(query.as_bytes(), names) {
        return Cow::Borrowed(query);
    }
    let drop = |pair: &str| names.iter().any(|n| param_is(pair, n));
    // Splitting bytes is cheaper than `str::split`; `&` is ASCII, so every
    // piece is still valid UTF-8.
    let any_dropped = query
        .as_bytes()
        .split(|b| *b == b'&')
        .any(|pair| std::str::from_utf8(pair).is_ok_and(drop));
    if !any_dropped {
        return Cow::Borrowed(query);
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !drop(p))
        .collect();
    Cow::Owned(kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounted_paths_normalise() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/basemaps/a/b", Ok("/basemaps/a/b")),
            ("/a/../b/x", Ok("/b/x")),
            ("/a/./b", Ok("/a/b")),
            ("/a/%2e%2e/b", Ok("/b")),
            ("/a/%2E%2E/b", Ok("/b")),
            ("/a/.%2e/b", Ok("/b")),
            ("/../../etc/passwd", Ok("/etc/passwd")),
            ("/a/%252e%252e/b", Ok("/a/%252e%252e/b")),
            ("/a//b", Ok("/a//b")),
            ("/a;x=1/b", Ok("/a;x=1/b")),
            ("/a/%2F/b", Err(PathError::ForbiddenCharacter)),
            ("/a/%2f..%2fb", Err(PathError::ForbiddenCharacter)),
            ("/a/%5C../b", Err(PathError::ForbiddenCharacter)),
            ("/a/\\../b", Err(PathError::ForbiddenCharacter)),
            ("/a/%00/b", Err(PathError::ForbiddenCharacter)),
            ("/a/\u{1}/b", Err(PathError::ForbiddenCharacter)),
            ("a/b", Err(PathError::BadPath)),
            ("*", Err(PathError::BadPath)),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                normalise_path(raw).as_deref().map_err(|e| *e),
                *expected,
                "{raw:?}"
            );
        }
    }

    proptest::proptest! {
        // The fast path must agree with the URL parser on every path it takes.
        #[test]
        fn fast_path_agrees_with_the_parser(raw in "/[a-z0-9./;=@~*+!$&'(),:_-]{0,40}") {
            if already_normal(&raw) {
                proptest::prop_assert_eq!(normalise_path_with_parser(&raw).unwrap(), raw);
            }
        }

        // The pre-check that lets most queries skip decoding must never
        // keep a parameter the full comparison would drop.
        #[test]
        fn token_pre_check_agrees_with_the_full_comparison(
            q in "[a-zA-Z0-9=&%+]{0,12}(token|TOKEN|ToKeN|%74oken|tok%65n|t+oken|echotoken|echoToken)?[a-zA-Z0-9=&%+]{0,12}"
        ) {
            for names in [&["token"][..], &["token", "echotoken"][..]] {
                let full: Vec<&str> = q
                    .split('&')
                    .filter(|p| !p.is_empty() && !names.iter().any(|n| param_is(p, n)))
                    .collect();
                let any_dropped = q.split('&').any(|p| names.iter().any(|n| param_is(p, n)));
                let expected = if any_dropped { full.join("&") } else { q.clone() };
                proptest::prop_assert_eq!(strip_params(&q, names).into_owned(), expected, "{:?}", q);
            }
        }
    }

    #[test]
    fn targets_parse_and_normalise() {
        let ok: &[(&str, &str)] = &[
            (
                "https://Services.ArcGIS.com/a/b?f=json",
                "https://services.arcgis.com/a/b?f=json",
            ),
            ("https://h.com:443/a/../b", "https://h.com/b"),
            ("https://h.com/a/%2e%2e/b", "https://h.com/b"),
            ("http://h.com:80/x", "http://h.com/x"),
            ("https://h.com./x", "https://h.com./x"),
            ("https://0x7f.1/x", "https://127.0.0.1/x"),
            ("https://2130706433/x", "https://127.0.0.1/x"),
            ("https://[::1]/x", "https://[::1]/x"),
            (
                "https://bücher.example/x",
                "https://xn--bcher-kva.example/x",
            ),
            (
                "https://h.com/x?where=a%2Fb&url=https://e.com/",
                "https://h.com/x?where=a%2Fb&url=https://e.com/",
            ),
            ("ftp://h.com/x", "ftp://h.com/x"),
        ];
        for (raw, expected) in ok {
            assert_eq!(parse_target(raw).unwrap().as_str(), *expected, "{raw:?}");
        }
        let bad: &[(&str, PathError)] = &[
            ("", PathError::MissingTarget),
            ("https://u:p@h.com/x", PathError::Userinfo),
            ("https://h.com@evil.com/x", PathError::Userinfo),
            (
                "https://h.com/a%2F..%2F..%2Fx",
                PathError::ForbiddenCharacter,
            ),
            ("https://h.com/a\\..\\x", PathError::ForbiddenCharacter),
            ("https://h.com\\@evil.com/", PathError::ForbiddenCharacter),
            ("https://h.com/a%5cb", PathError::ForbiddenCharacter),
            ("https://h.com/a%00b", PathError::ForbiddenCharacter),
            ("https://h.com/x?a=%00", PathError::ForbiddenCharacter),
            ("https://h.com/a b", PathError::ForbiddenCharacter),
            ("https://h.com/a\tb", PathError::ForbiddenCharacter),
            ("//h.com/x", PathError::MalformedTarget),
            ("h.com/x", PathError::MalformedTarget),
            ("https:///x", PathError::MalformedTarget),
            ("https://", PathError::MalformedTarget),
            ("https://[::1/x", PathError::MalformedTarget),
        ];
        for (raw, expected) in bad {
            assert_eq!(parse_target(raw).unwrap_err(), *expected, "{raw:?}");
        }
    }

    #[test]
    fn byte_sets_hold_letters_digits_and_the_extras_only() {
        let t = ascii_set(b"-%");
        assert_eq!(t.iter().filter(|b| **b).count(), 62 + 2);
        for b in [b'a', b'z', b'A', b'Z', b'0', b'9', b'-', b'%'] {
            assert!(t[usize::from(b)], "{}", b as char);
        }
        for b in [b'/', b' ', b'.', 0x7f, 0x80, 0xe9, 0xff] {
            assert!(!t[usize::from(b)], "{b:#x}");
        }
    }

    #[test]
    fn token_params_are_stripped_in_any_spelling() {
        let names = ["token"];
        let cases = [
            ("f=json&token=abc&where=1", "f=json&where=1"),
            ("token=abc", ""),
            ("TOKEN=abc&f=json", "f=json"),
            ("%74oken=abc&f=json", "f=json"),
            ("f=json&token", "f=json"),
            ("tokens=1&f=json", "tokens=1&f=json"),
            ("mytoken=1", "mytoken=1"),
            ("f=json&&token=a&token=b", "f=json"),
            ("f=json", "f=json"),
            ("ToKeN=1&x=2", "x=2"),
            ("f=json&tok%65n=a", "f=json"),
            ("a=token&b=TOKEN", "a=token&b=TOKEN"),
            ("where=1%3D1&outFields=*", "where=1%3D1&outFields=*"),
        ];
        for (q, expected) in cases {
            assert_eq!(strip_params(q, &names), expected, "{q:?}");
        }
    }
}
