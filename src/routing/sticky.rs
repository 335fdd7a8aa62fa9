//! Sticky user buckets: the FNV-1a hash that maps a user id to one of 10 000 buckets, the
//! lookup of the user id in a request (header, then cookie, then the sticky cookie), and the
//! cookie that gives anonymous visitors an id of their own.
//!
//! The formula is part of the product contract, because operators compute it outside the proxy
//! to know which version a given user sees:
//! `bucket = fnv1a_32(sticky_salt + user_id) mod 10000`, over the UTF-8 bytes.

use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::id::{Id, hex};

/// Number of sticky buckets; backends own consecutive ranges of `[0, BUCKETS)`.
pub const BUCKETS: u32 = 10_000;

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a, 32-bit, over `salt` followed by `id`, without concatenating them.
pub fn fnv1a_32(salt: &[u8], id: &[u8]) -> u32 {
    // Two plain loops: a chained iterator costs a branch per byte.
    let step = |hash: u32, &byte: &u8| (hash ^ u32::from(byte)).wrapping_mul(FNV_PRIME);
    let hash = salt.iter().fold(FNV_OFFSET_BASIS, step);
    id.iter().fold(hash, step)
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
    /// The proxy's own cookie for anonymous visitors: read last; a request with no user id
    /// gets a new one in it.
    pub anonymous: Option<StickyCookie>,
}

/// The cookie (`proxy.sticky_cookie`) that keeps an anonymous visitor on one version.
#[derive(Debug, Clone)]
pub struct StickyCookie {
    pub name: String,
    pub max_age: Duration,
    /// What `Set-Cookie` has after the id, made once.
    attributes: String,
}

impl StickyCookie {
    pub fn new(name: String, max_age: Duration) -> Self {
        let attributes = format!(
            "; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
            max_age.as_secs()
        );
        StickyCookie {
            name,
            max_age,
            attributes,
        }
    }
}

/// Where a request's user id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// `proxy.user_id_header`.
    Header,
    /// `proxy.user_id_cookie`.
    Cookie,
    /// `proxy.sticky_cookie`, given by the proxy on an earlier response.
    StickyCookie,
}

impl IdSource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdSource::Header => "header",
            IdSource::Cookie => "cookie",
            IdSource::StickyCookie => "sticky_cookie",
        }
    }
}

impl StickySettings {
    /// The user id of a request and where it was found: the first non-empty value of the
    /// header, the cookie, then the sticky cookie.
    pub fn user_id<'a>(&self, headers: &'a HeaderMap) -> Option<(&'a [u8], IdSource)> {
        if let Some(name) = &self.header
            && let Some(value) = headers.get(name)
            && !value.is_empty()
        {
            return Some((value.as_bytes(), IdSource::Header));
        }
        let named = |name: &str, source| {
            cookie(headers, name)
                .filter(|v| !v.is_empty())
                .map(|id| (id, source))
        };
        self.cookie
            .as_deref()
            .and_then(|name| named(name, IdSource::Cookie))
            .or_else(|| {
                let anonymous = self.anonymous.as_ref()?;
                named(&anonymous.name, IdSource::StickyCookie)
            })
    }

    /// The sticky bucket of a request, when it carries a user id.
    pub fn bucket_of(&self, headers: &HeaderMap) -> Option<u32> {
        self.user_id(headers)
            .map(|(id, _)| bucket(self.salt.as_bytes(), id))
    }

    /// The sticky bucket of a new anonymous user id (`id` as its cookie carries it).
    pub fn bucket_of_new(&self, id: Id) -> u32 {
        bucket(self.salt.as_bytes(), &hex(id))
    }

    /// `Set-Cookie` giving an anonymous visitor the id `id`; `None` without a sticky cookie.
    /// `secure` (the request came over TLS) adds `Secure`: the browser sends the cookie back
    /// over TLS only.
    pub fn set_cookie(&self, id: Id, secure: bool) -> Option<HeaderValue> {
        const SECURE: &[u8] = b"; Secure";
        let anonymous = self.anonymous.as_ref()?;
        let id = hex(id);
        let mut value = Vec::with_capacity(
            anonymous.name.len() + 1 + id.len() + anonymous.attributes.len() + SECURE.len(),
        );
        value.extend_from_slice(anonymous.name.as_bytes());
        value.push(b'=');
        value.extend_from_slice(&id);
        value.extend_from_slice(anonymous.attributes.as_bytes());
        if secure {
            value.extend_from_slice(SECURE);
        }
        HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
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
            anonymous: Some(StickyCookie::new(
                "canary_uid".into(),
                Duration::from_secs(60),
            )),
        };
        let all = headers(&[("x-user-id", "h"), ("cookie", "uid=c; canary_uid=s")]);
        assert_eq!(sticky.user_id(&all), Some((&b"h"[..], IdSource::Header)));
        let cookies = headers(&[("cookie", "canary_uid=s; uid=c")]);
        assert_eq!(
            sticky.user_id(&cookies),
            Some((&b"c"[..], IdSource::Cookie))
        );
        let empty_header = headers(&[("x-user-id", ""), ("cookie", "uid=c")]);
        assert_eq!(
            sticky.user_id(&empty_header),
            Some((&b"c"[..], IdSource::Cookie))
        );
        let anonymous = headers(&[("cookie", "uid=; canary_uid=s")]);
        assert_eq!(
            sticky.user_id(&anonymous),
            Some((&b"s"[..], IdSource::StickyCookie))
        );
        assert_eq!(sticky.user_id(&HeaderMap::new()), None);
        assert_eq!(sticky.bucket_of(&cookies), Some(bucket(b"", b"c")));
        let without = StickySettings {
            anonymous: None,
            ..sticky
        };
        assert_eq!(without.user_id(&anonymous), None);
    }

    #[test]
    fn a_new_id_is_bucketed_as_its_cookie_will_be() {
        let sticky = StickySettings {
            salt: "s".into(),
            anonymous: Some(StickyCookie::new(
                "canary_uid".into(),
                Duration::from_secs(720 * 3600),
            )),
            ..StickySettings::default()
        };
        let id = 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef_u128.to_le_bytes();
        let set = sticky.set_cookie(id, false).unwrap();
        assert_eq!(
            set,
            "canary_uid=fedcba9876543210fedcba9876543210; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            sticky.set_cookie(id, true).unwrap(),
            "canary_uid=fedcba9876543210fedcba9876543210; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax; Secure"
        );
        let value = set.to_str().unwrap().split(';').next().unwrap();
        let next = headers(&[("cookie", "other=1")]);
        let mut next = next;
        next.append(COOKIE, HeaderValue::from_str(value).unwrap());
        assert_eq!(sticky.bucket_of(&next), Some(sticky.bucket_of_new(id)));
        assert_eq!(StickySettings::default().set_cookie(id, true), None);
    }
}
