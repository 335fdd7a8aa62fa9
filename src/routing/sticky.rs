//! Sticky user buckets: the FNV-1a hash that maps a user id to one of 10 000 buckets, and the
//! lookup of the user id in a request (header first, then cookie).
//!
//! The formula is part of the product contract, because operators compute it outside the proxy
//! to know which version a given user sees:
//! `bucket = fnv1a_32(sticky_salt + user_id) mod 10000`, over the UTF-8 bytes.

use http::HeaderMap;
use http::HeaderName;
use http::header::COOKIE;

/// Number of sticky buckets; backends own consecutive ranges of `[0, BUCKETS)`.
pub const BUCKETS: u32 = 10_000;

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a, 32-bit, over `salt` followed by `id`, without concatenating them.
pub fn fnv1a_32(salt: &[u8], id: &[u8]) -> u32 {
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in salt.iter().chain(id) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The sticky bucket, in `[0, BUCKETS)`, of a user id under a salt.
pub fn bucket(salt: &[u8], user_id: &[u8]) -> u32 {
    fnv1a_32(salt, user_id) % BUCKETS
}

/// Where the proxy reads the user id from, and the salt it hashes with.
#[derive(Debug, Clone, Default)]
pub struct StickySettings {
    /// Header carrying the user id; read first.
    pub header: Option<HeaderName>,
    /// Cookie carrying the user id; read when the header is absent.
    pub cookie: Option<String>,
    /// Prefixed to the user id before hashing, so different services can bucket differently.
    pub salt: String,
}

impl StickySettings {
    /// The user id of a request: the first non-empty value of the header, else the cookie.
    pub fn user_id<'a>(&self, headers: &'a HeaderMap) -> Option<&'a [u8]> {
        if let Some(name) = &self.header
            && let Some(value) = headers.get(name)
            && !value.is_empty()
        {
            return Some(value.as_bytes());
        }
        let name = self.cookie.as_deref()?;
        cookie(headers, name).filter(|v| !v.is_empty())
    }

    /// The sticky bucket of a request, when it carries a user id.
    pub fn bucket_of(&self, headers: &HeaderMap) -> Option<u32> {
        self.user_id(headers)
            .map(|id| bucket(self.salt.as_bytes(), id))
    }
}

/// The value of cookie `name`, searched over every `Cookie` header (HTTP/2 clients may split
/// cookies across several). Surrounding double quotes are kept, as RFC 6265 says.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let name = name.as_bytes();
    headers
        .get_all(COOKIE)
        .iter()
        .find_map(|value| cookie_in(value.as_bytes(), name))
}

/// The value of cookie `name` in one `Cookie` line (`a=1; b=2`). Pairs are found with memchr,
/// and the `=` right after the name is checked before the name is compared.
fn cookie_in<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut start = 0;
    loop {
        let end = memchr::memchr(b';', &line[start..]).map_or(line.len(), |i| start + i);
        let pair = line[start..end].trim_ascii_start();
        if pair.len() > name.len() && pair[name.len()] == b'=' && pair.starts_with(name) {
            return Some(pair[name.len() + 1..].trim_ascii_end());
        }
        if end == line.len() {
            return None;
        }
        start = end + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn fnv1a_matches_published_vectors() {
        // Test vectors from the FNV reference (http://www.isthe.com/chongo/src/fnv/test_fnv.c).
        assert_eq!(fnv1a_32(b"", b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"", b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"", b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn salt_is_a_prefix() {
        assert_eq!(fnv1a_32(b"foo", b"bar"), fnv1a_32(b"", b"foobar"));
        assert_eq!(
            bucket(b"s", b"user-42"),
            fnv1a_32(b"", b"suser-42") % 10_000
        );
    }

    #[test]
    fn bucket_is_below_ten_thousand() {
        for i in 0..1000u32 {
            assert!(bucket(b"", i.to_string().as_bytes()) < BUCKETS);
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn cookie_lookup_handles_spacing_and_several_headers() {
        let h = headers(&[("cookie", "a=1; uidx=no"), ("cookie", "b=2;uid=alice ")]);
        assert_eq!(cookie(&h, "uid"), Some(&b"alice"[..]));
        assert_eq!(cookie(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie(&h, "c"), None);
        // A cookie whose name merely starts with the wanted name does not match.
        assert_eq!(cookie(&headers(&[("cookie", "uidx=1")]), "uid"), None);
        assert_eq!(cookie(&headers(&[("cookie", "uid")]), "uid"), None);
        assert_eq!(
            cookie(&headers(&[("cookie", "x=1;;uid=;")]), "uid"),
            Some(&b""[..])
        );
        assert_eq!(
            cookie(&headers(&[("cookie", "x=1;uid=7 ")]), "uid"),
            Some(&b"7"[..])
        );
        assert_eq!(cookie(&headers(&[("cookie", "=1")]), ""), Some(&b"1"[..]));
    }

    #[test]
    fn user_id_prefers_header_then_cookie() {
        let sticky = StickySettings {
            header: Some(HeaderName::from_static("x-user-id")),
            cookie: Some("uid".into()),
            salt: String::new(),
        };
        let both = headers(&[("x-user-id", "h"), ("cookie", "uid=c")]);
        assert_eq!(sticky.user_id(&both), Some(&b"h"[..]));
        let cookie_only = headers(&[("cookie", "uid=c")]);
        assert_eq!(sticky.user_id(&cookie_only), Some(&b"c"[..]));
        let empty_header = headers(&[("x-user-id", ""), ("cookie", "uid=c")]);
        assert_eq!(sticky.user_id(&empty_header), Some(&b"c"[..]));
        assert_eq!(sticky.user_id(&HeaderMap::new()), None);
        assert_eq!(sticky.bucket_of(&cookie_only), Some(bucket(b"", b"c")));
    }
}
