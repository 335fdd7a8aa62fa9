//! The comparison of a served response with the response of its copy, as Diffy does it: the
//! status, the headers (less the hop-by-hop, framing and ignored ones), and the body,
//! structurally when both sides are JSON, else byte for byte. Each difference is named by a
//! path from a bounded set (`status`, `header.etag`, `body.items[].price`): array indices
//! collapse to `[]` and a path is reported once, with its first values. A comparison reports at
//! most [`MAX_DIFFERENCES`] paths and walks JSON at most [`MAX_DEPTH`] levels deep, whatever
//! the responses hold.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::io;

use serde_json::{Map, Number, Value};

/// The most differences one comparison reports; later ones are dropped.
pub const MAX_DIFFERENCES: usize = 64;
/// The JSON levels walked; a subtree below them is compared whole, at its path.
pub const MAX_DEPTH: usize = 32;
/// The most bytes of a value shown in a difference, "…" not counted.
const MAX_SHOWN: usize = 200;
/// Shown for the side that lacks a header, a JSON key or an array.
const ABSENT: &str = "(absent)";

/// Headers about one connection or about the framing of the body: they differ between two
/// hops of the same response, so they say nothing about the versions.
const HOP_BY_HOP_AND_FRAMING: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// FNV-1a 64's start value: the hash of no bytes.
pub const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A response as captured for comparison.
#[derive(Debug, Clone)]
pub struct Captured {
    pub status: u16,
    /// Header fields in order, names lowercase; repeated names allowed.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: CapturedBody,
}

/// A captured body: whole when it is small enough to keep, else only what identifies it.
#[derive(Debug, Clone)]
pub enum CapturedBody {
    /// The whole body (it fit the capture limit).
    Whole(bytes::Bytes),
    /// A body over the limit: its length and a 64-bit FNV-1a hash of all of it.
    Digest { len: u64, hash: u64 },
}

/// What the comparison leaves out, from the `[mirror]` section: parts of a response that
/// differ on every request (dates, ids) and would hide the differences that matter.
#[derive(Debug, Clone, Default)]
pub struct CompareSettings {
    /// Lowercase header names left out (besides the hop-by-hop and framing ones, always left
    /// out).
    pub ignore_headers: Vec<String>,
    /// JSON object keys left out at any depth.
    pub ignore_fields: Vec<String>,
}

/// One place where the copy's response differs from the served one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// `status`, `header.NAME`, `body` (bytes differ, or not both JSON), or a JSON path such
    /// as `body.items[].price`.
    pub path: String,
    /// The served side's value and the copy's, as text, each cut to 200 bytes (on a char
    /// boundary, with "…" appended when cut); `(absent)` when one side lacks it.
    pub served: String,
    pub copy: String,
}

/// FNV-1a 64 over bytes, continuing from `hash` (start with [`FNV64_OFFSET`]), so a body can
/// be hashed piece by piece as it streams.
pub fn fnv1a_64(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV64_PRIME)
    })
}

/// The differences between the served response and the copy's; empty when they agree.
/// Bounded: at most [`MAX_DIFFERENCES`] (64) entries, JSON walked to [`MAX_DEPTH`] (32) levels
/// (deeper subtrees compared whole at that path, as their serialized text would be: there `1`
/// and `1.0` differ and ignored fields count).
pub fn compare(served: &Captured, copy: &Captured, settings: &CompareSettings) -> Vec<Difference> {
    let mut found = Found::default();
    if served.status != copy.status {
        found.add("status", || {
            (served.status.to_string(), copy.status.to_string())
        });
    }
    compare_headers(served, copy, settings, &mut found);
    compare_bodies(&served.body, &copy.body, settings, &mut found);
    found.differences
}

/// The differences found so far, each path once, at most [`MAX_DIFFERENCES`].
#[derive(Default)]
struct Found {
    differences: Vec<Difference>,
}

impl Found {
    fn is_full(&self) -> bool {
        self.differences.len() >= MAX_DIFFERENCES
    }

    /// Records a difference at `path` unless that path is already recorded or the list is
    /// full; `values` (the served side's and the copy's) is only called when it is recorded.
    fn add(&mut self, path: &str, values: impl FnOnce() -> (String, String)) {
        if self.is_full() || self.differences.iter().any(|known| known.path == path) {
            return;
        }
        let (served, copy) = values();
        self.differences.push(Difference {
            path: path.to_owned(),
            served,
            copy,
        });
    }
}

fn compare_headers(
    served: &Captured,
    copy: &Captured,
    settings: &CompareSettings,
    found: &mut Found,
) {
    let served = compared_fields(served, settings);
    let copy = compared_fields(copy, settings);
    let names: BTreeSet<&str> = served.keys().chain(copy.keys()).copied().collect();
    for name in names {
        let (served, copy) = (served.get(name), copy.get(name));
        if served != copy {
            found.add(&format!("header.{name}"), || {
                (shown_field(served), shown_field(copy))
            });
        }
    }
}

/// The header fields compared, by name: the repeated fields of a name joined with ", " in
/// their order.
fn compared_fields<'a>(
    captured: &'a Captured,
    settings: &CompareSettings,
) -> BTreeMap<&'a str, Vec<u8>> {
    let mut fields = BTreeMap::new();
    for (name, value) in &captured.headers {
        if HOP_BY_HOP_AND_FRAMING.contains(&name.as_str()) || settings.ignore_headers.contains(name)
        {
            continue;
        }
        match fields.entry(name.as_str()) {
            Entry::Vacant(entry) => {
                entry.insert(value.clone());
            }
            Entry::Occupied(mut entry) => {
                let joined: &mut Vec<u8> = entry.get_mut();
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(value);
            }
        }
    }
    fields
}

fn shown_field(value: Option<&Vec<u8>>) -> String {
    value.map_or_else(|| ABSENT.to_owned(), |value| shown_bytes(value))
}

/// Two whole bodies that both parse as JSON are walked; any other pair is one `body`
/// difference unless the bytes (or their length and hash) agree.
fn compare_bodies(
    served: &CapturedBody,
    copy: &CapturedBody,
    settings: &CompareSettings,
    found: &mut Found,
) {
    if let (CapturedBody::Whole(served), CapturedBody::Whole(copy)) = (served, copy) {
        if served == copy {
            return;
        }
        if let Ok(served) = serde_json::from_slice::<Value>(served)
            && let Ok(copy) = serde_json::from_slice::<Value>(copy)
        {
            let mut walk = JsonWalk {
                ignore_fields: &settings.ignore_fields,
                found,
                path: String::from("body"),
            };
            walk.value(&served, &copy, 0);
            return;
        }
    } else if length_and_hash(served) == length_and_hash(copy) {
        return;
    }
    found.add("body", || (shown_body(served), shown_body(copy)));
}

fn length_and_hash(body: &CapturedBody) -> (u64, u64) {
    match body {
        CapturedBody::Whole(bytes) => (bytes.len() as u64, fnv1a_64(FNV64_OFFSET, bytes)),
        CapturedBody::Digest { len, hash } => (*len, *hash),
    }
}

fn shown_body(body: &CapturedBody) -> String {
    match body {
        CapturedBody::Whole(bytes) if bytes.is_empty() => String::from("(empty)"),
        CapturedBody::Whole(bytes) => shown_bytes(bytes),
        CapturedBody::Digest { len, hash } => format!("({len} bytes, fnv {hash:016x})"),
    }
}

/// The structural comparison of two JSON bodies.
struct JsonWalk<'a> {
    ignore_fields: &'a [String],
    found: &'a mut Found,
    /// The path of the values being compared: grown on the way down, cut back on the way up.
    path: String,
}

impl JsonWalk<'_> {
    /// Compares two values `depth` levels below the body's root.
    fn value(&mut self, served: &Value, copy: &Value, depth: usize) {
        if self.found.is_full() {
            return;
        }
        match (served, copy) {
            (Value::Object(served), Value::Object(copy)) if depth < MAX_DEPTH => {
                self.object(served, copy, depth);
            }
            (Value::Array(served), Value::Array(copy)) if depth < MAX_DEPTH => {
                self.array(served, copy, depth);
            }
            (Value::Number(s), Value::Number(c)) if same_number(s, c) => {}
            _ if served == copy => {}
            _ => self
                .found
                .add(&self.path, || (json_text(served), json_text(copy))),
        }
    }

    fn object(&mut self, served: &Map<String, Value>, copy: &Map<String, Value>, depth: usize) {
        let copy_only = copy.keys().filter(|key| !served.contains_key(*key));
        for key in served.keys().chain(copy_only) {
            if self.found.is_full() {
                return;
            }
            if self.ignore_fields.contains(key) {
                continue;
            }
            let parent = self.path.len();
            self.path.push('.');
            self.path.push_str(key);
            match (served.get(key), copy.get(key)) {
                (Some(served), Some(copy)) => self.value(served, copy, depth + 1),
                (served, copy) => self
                    .found
                    .add(&self.path, || (shown_json(served), shown_json(copy))),
            }
            self.path.truncate(parent);
        }
    }

    /// Elements are compared by index under one path, `[]` for every index; a difference in
    /// length is reported at that path too, and the common prefix still compared.
    fn array(&mut self, served: &[Value], copy: &[Value], depth: usize) {
        let parent = self.path.len();
        self.path.push_str("[]");
        if served.len() != copy.len() {
            self.found
                .add(&self.path, || (items(served.len()), items(copy.len())));
        }
        for (served, copy) in served.iter().zip(copy) {
            if self.found.is_full() {
                break;
            }
            self.value(served, copy, depth + 1);
        }
        self.path.truncate(parent);
    }
}

/// JSON numbers are equal when their values are: `1` and `1.0` agree. Two integers compare
/// exactly, as `2^53` and `2^53 + 1` are one f64.
fn same_number(served: &Number, copy: &Number) -> bool {
    served == copy || (served.is_f64() || copy.is_f64()) && served.as_f64() == copy.as_f64()
}

fn items(count: usize) -> String {
    match count {
        1 => String::from("(1 item)"),
        _ => format!("({count} items)"),
    }
}

fn shown_json(value: Option<&Value>) -> String {
    value.map_or_else(|| ABSENT.to_owned(), json_text)
}

/// A value as compact JSON, cut like every value shown; serializing stops soon after the cut,
/// however big the value.
fn json_text(value: &Value) -> String {
    let mut head = Head(Vec::new());
    // The only error is `Head` refusing bytes once full, which is what ends a big value early.
    let _ = serde_json::to_writer(&mut head, value);
    shown_bytes(&head.0)
}

/// Keeps the first bytes written to it, as many as [`shown_bytes`] looks at.
struct Head(Vec<u8>);

impl io::Write for Head {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let taken = bytes.len().min(SHOWN_HEAD - self.0.len());
        self.0.extend_from_slice(&bytes[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The bytes [`shown_bytes`] needs: those shown, and one past them to know whether any are
/// left out.
const SHOWN_HEAD: usize = MAX_SHOWN + 1;

/// Bytes as text (invalid UTF-8 replaced), cut to [`MAX_SHOWN`] bytes on a char boundary with
/// "…" appended when cut.
fn shown_bytes(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(SHOWN_HEAD)];
    let text = String::from_utf8_lossy(head);
    if text.len() <= MAX_SHOWN {
        return text.into_owned();
    }
    // A char cut off at the end of the head became U+FFFD, which starts at or after the char
    // boundary found here, so the text kept is the original's.
    let end = text.floor_char_boundary(MAX_SHOWN);
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use serde_json::json;

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Captured {
        Captured {
            status,
            headers: headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                .collect(),
            body: CapturedBody::Whole(Bytes::from(body.to_owned())),
        }
    }

    fn with_body(body: CapturedBody) -> Captured {
        Captured {
            status: 200,
            headers: Vec::new(),
            body,
        }
    }

    fn whole(bytes: &[u8]) -> CapturedBody {
        CapturedBody::Whole(Bytes::copy_from_slice(bytes))
    }

    fn settings(ignore_headers: &[&str], ignore_fields: &[&str]) -> CompareSettings {
        CompareSettings {
            ignore_headers: ignore_headers.iter().map(|name| name.to_string()).collect(),
            ignore_fields: ignore_fields.iter().map(|key| key.to_string()).collect(),
        }
    }

    fn difference(path: &str, served: &str, copy: &str) -> Difference {
        Difference {
            path: path.to_owned(),
            served: served.to_owned(),
            copy: copy.to_owned(),
        }
    }

    fn compare_bodies(served: &str, copy: &str) -> Vec<Difference> {
        compare_json(served, copy, &CompareSettings::default())
    }

    fn compare_json(served: &str, copy: &str, settings: &CompareSettings) -> Vec<Difference> {
        compare(
            &response(200, &[], served),
            &response(200, &[], copy),
            settings,
        )
    }

    fn paths(differences: &[Difference]) -> Vec<&str> {
        differences.iter().map(|d| d.path.as_str()).collect()
    }

    #[test]
    fn identical_responses_have_no_differences() {
        let body = r#"{"items": [{"id": 1, "price": 9.5}], "next": null}"#;
        let headers = [("content-type", "application/json"), ("vary", "accept")];
        let served = response(200, &headers, body);
        assert_eq!(
            compare(&served, &served.clone(), &CompareSettings::default()),
            []
        );
        let text = response(404, &[], "not found");
        assert_eq!(compare(&text, &text, &CompareSettings::default()), []);
    }

    #[test]
    fn a_different_status_is_reported_first() {
        let served = response(200, &[("x-version", "1")], "ok");
        let copy = response(503, &[("x-version", "2")], "ok");
        assert_eq!(
            compare(&served, &copy, &CompareSettings::default()),
            [
                difference("status", "200", "503"),
                difference("header.x-version", "1", "2"),
            ]
        );
    }

    #[test]
    fn ignored_headers_are_left_out() {
        let served = response(200, &[("date", "Mon"), ("server", "a")], "");
        let copy = response(200, &[("date", "Tue")], "");
        assert_eq!(
            compare(&served, &copy, &settings(&["date", "server"], &[])),
            []
        );
        assert_eq!(
            paths(&compare(&served, &copy, &settings(&["server"], &[]))),
            ["header.date"]
        );
    }

    #[test]
    fn hop_by_hop_and_framing_headers_are_always_left_out() {
        let served = response(
            200,
            &[
                ("connection", "close"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("te", "trailers"),
                ("trailer", "x-sum"),
                ("upgrade", "h2c"),
            ],
            "same",
        );
        let copy = response(
            200,
            &[
                ("content-length", "4"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authenticate", "Basic"),
                ("proxy-authorization", "Basic eA=="),
            ],
            "same",
        );
        assert_eq!(compare(&served, &copy, &CompareSettings::default()), []);
    }

    #[test]
    fn a_header_on_one_side_only_is_absent_on_the_other() {
        let served = response(200, &[("x-cache", "hit")], "");
        let copy = response(200, &[("x-debug", "on")], "");
        assert_eq!(
            compare(&served, &copy, &CompareSettings::default()),
            [
                difference("header.x-cache", "hit", "(absent)"),
                difference("header.x-debug", "(absent)", "on"),
            ]
        );
    }

    #[test]
    fn repeated_fields_are_joined_in_order() {
        let served = response(200, &[("vary", "accept"), ("vary", "cookie")], "");
        let joined = response(200, &[("vary", "accept, cookie")], "");
        assert_eq!(compare(&served, &joined, &CompareSettings::default()), []);
        let reversed = response(200, &[("vary", "cookie"), ("vary", "accept")], "");
        assert_eq!(
            compare(&served, &reversed, &CompareSettings::default()),
            [difference(
                "header.vary",
                "accept, cookie",
                "cookie, accept"
            )]
        );
        let with_empty = response(200, &[("vary", ""), ("vary", "accept")], "");
        let one = response(200, &[("vary", "accept")], "");
        assert_eq!(
            compare(&with_empty, &one, &CompareSettings::default()),
            [difference("header.vary", ", accept", "accept")]
        );
    }

    #[test]
    fn header_paths_are_in_name_order() {
        let served = response(200, &[("x-b", "1"), ("x-c", "1"), ("x-a", "1")], "");
        let copy = response(200, &[("x-c", "2"), ("x-a", "2"), ("x-b", "2")], "");
        assert_eq!(
            paths(&compare(&served, &copy, &CompareSettings::default())),
            ["header.x-a", "header.x-b", "header.x-c"]
        );
    }

    #[test]
    fn json_array_indices_collapse_and_each_path_is_reported_once() {
        let served = r#"{"items": [{"name": "a", "price": 1}, {"name": "b", "price": 2},
            {"name": "c", "price": 3}], "total": 6}"#;
        let copy = r#"{"items": [{"name": "a", "price": 10}, {"name": "B", "price": 2},
            {"name": "c", "price": 30}], "total": 42}"#;
        assert_eq!(
            compare_bodies(served, copy),
            [
                difference("body.items[].price", "1", "10"),
                difference("body.items[].name", "\"b\"", "\"B\""),
                difference("body.total", "6", "42"),
            ]
        );
    }

    #[test]
    fn arrays_of_different_lengths_report_the_lengths_and_compare_the_common_prefix() {
        assert_eq!(
            compare_bodies(r#"{"ids": [1, 2, 3]}"#, r#"{"ids": [1, 2, 3, 4]}"#),
            [difference("body.ids[]", "(3 items)", "(4 items)")]
        );
        assert_eq!(
            compare_bodies(
                r#"{"items": [{"p": 1}, {"p": 2}]}"#,
                r#"{"items": [{"p": 5}]}"#
            ),
            [
                difference("body.items[]", "(2 items)", "(1 item)"),
                difference("body.items[].p", "1", "5"),
            ]
        );
        assert_eq!(
            compare_bodies("[]", "[0]"),
            [difference("body[]", "(0 items)", "(1 item)")]
        );
    }

    #[test]
    fn a_type_mismatch_is_one_difference_with_both_values_as_json() {
        assert_eq!(
            compare_bodies(r#"{"a": 1}"#, r#"{"a": "1"}"#),
            [difference("body.a", "1", "\"1\"")]
        );
        assert_eq!(
            compare_bodies(r#"{"a": {"b": [1, 2]}}"#, r#"{"a": [{"b": 1}]}"#),
            [difference("body.a", r#"{"b":[1,2]}"#, r#"[{"b":1}]"#)]
        );
        assert_eq!(
            compare_bodies("null", "false"),
            [difference("body", "null", "false")]
        );
    }

    #[test]
    fn a_key_on_one_side_only_is_absent_on_the_other() {
        assert_eq!(
            compare_bodies(r#"{"a": {"x": 1}, "b": 2}"#, r#"{"b": 2, "c": [true]}"#),
            [
                difference("body.a", r#"{"x":1}"#, "(absent)"),
                difference("body.c", "(absent)", "[true]"),
            ]
        );
    }

    #[test]
    fn numbers_compare_by_value() {
        assert_eq!(compare_bodies(r#"{"n": 1}"#, r#"{"n": 1.0}"#), []);
        assert_eq!(compare_bodies("[100, -0.5]", "[1e2, -5e-1]"), []);
        assert_eq!(
            compare_bodies("9007199254740993", "9007199254740992"),
            [difference("body", "9007199254740993", "9007199254740992")]
        );
        assert_eq!(
            compare_bodies("[1.5]", "[1.25]"),
            [difference("body[]", "1.5", "1.25")]
        );
    }

    #[test]
    fn ignored_fields_are_left_out_at_any_depth() {
        let served = r#"{"ts": 1, "data": {"items": [{"id": 1, "ts": 5, "request_id": "a"}]}}"#;
        let copy = r#"{"ts": 2, "data": {"items": [{"id": 1, "ts": 6}]}, "request_id": "b"}"#;
        let ignoring = settings(&[], &["ts", "request_id"]);
        assert_eq!(compare_json(served, copy, &ignoring), []);
        assert_eq!(
            paths(&compare_json(served, copy, &settings(&[], &["ts"]))),
            ["body.data.items[].request_id", "body.request_id"]
        );
    }

    #[test]
    fn bodies_that_are_not_both_json_compare_by_bytes() {
        assert_eq!(compare_bodies("hello", "hello"), []);
        assert_eq!(
            compare_bodies("hello", "hellp"),
            [difference("body", "hello", "hellp")]
        );
        assert_eq!(
            compare_bodies(r#"{"a": 1}"#, "{\"a\": 1"),
            [difference("body", r#"{"a": 1}"#, "{\"a\": 1")]
        );
        assert_eq!(
            compare_bodies("", "[]"),
            [difference("body", "(empty)", "[]")]
        );
        let invalid = with_body(whole(b"ok\xff"));
        assert_eq!(
            compare(
                &invalid,
                &with_body(whole(b"ok")),
                &CompareSettings::default()
            ),
            [difference("body", "ok\u{fffd}", "ok")]
        );
    }

    #[test]
    fn digests_compare_by_length_and_hash() {
        let digest = |len, hash| with_body(CapturedBody::Digest { len, hash });
        let none = CompareSettings::default();
        assert_eq!(compare(&digest(1 << 20, 7), &digest(1 << 20, 7), &none), []);
        assert_eq!(
            compare(
                &digest(1_048_576, 0x0123_abcd),
                &digest(1_048_576, 8),
                &none
            ),
            [difference(
                "body",
                "(1048576 bytes, fnv 000000000123abcd)",
                "(1048576 bytes, fnv 0000000000000008)"
            )]
        );
        assert_eq!(
            paths(&compare(&digest(10, 7), &digest(11, 7), &none)),
            ["body"]
        );
    }

    #[test]
    fn a_whole_body_compares_with_a_digest_by_hashing_it() {
        let body = b"{\"big\": true}";
        let hash = fnv1a_64(FNV64_OFFSET, body);
        let digest = with_body(CapturedBody::Digest { len: 13, hash });
        let none = CompareSettings::default();
        assert_eq!(compare(&with_body(whole(body)), &digest, &none), []);
        assert_eq!(compare(&digest, &with_body(whole(body)), &none), []);
        assert_eq!(
            compare(&with_body(whole(b"{\"big\": false}")), &digest, &none),
            [difference(
                "body",
                "{\"big\": false}",
                &format!("(13 bytes, fnv {hash:016x})")
            )]
        );
    }

    #[test]
    fn fnv1a_64_matches_published_vectors_and_continues_piece_by_piece() {
        // Test vectors from the FNV reference (http://www.isthe.com/chongo/src/fnv/test_fnv.c).
        assert_eq!(fnv1a_64(FNV64_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(FNV64_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(FNV64_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            fnv1a_64(fnv1a_64(FNV64_OFFSET, b"foo"), b"bar"),
            fnv1a_64(FNV64_OFFSET, b"foobar")
        );
    }

    #[test]
    fn shown_values_are_cut_to_200_bytes_on_a_char_boundary() {
        // 'a' then 2-byte chars: byte 200 falls inside the hundredth 'é'.
        let long = format!("a{}", "é".repeat(150));
        let differences = compare_bodies(&long, "short");
        let shown = &differences[0].served;
        assert_eq!(shown, &format!("a{}…", "é".repeat(99)));
        assert_eq!(shown.len() - "…".len(), 199);

        let exactly = "€".repeat(66) + "ab";
        assert_eq!(exactly.len(), 200);
        assert_eq!(compare_bodies(&exactly, "x")[0].served, exactly);

        let in_json = json!({ "s": "€".repeat(100) }).to_string();
        let differences = compare_bodies(&in_json, r#"{"s": 1}"#);
        assert_eq!(differences[0].path, "body.s");
        assert_eq!(differences[0].served, format!("\"{}…", "€".repeat(66)));

        let header = "x".repeat(300);
        let served = response(200, &[("x-long", &header)], "");
        let differences = compare(
            &served,
            &response(200, &[], ""),
            &CompareSettings::default(),
        );
        assert_eq!(differences[0].served, format!("{}…", "x".repeat(200)));
    }

    #[test]
    fn a_thousand_differing_keys_give_exactly_the_cap() {
        let object = |value: u32| {
            let map: Map<String, Value> =
                (0..1000).map(|i| (format!("k{i}"), json!(value))).collect();
            Value::Object(map).to_string()
        };
        let differences = compare_bodies(&object(1), &object(2));
        assert_eq!(differences.len(), 64);
    }

    #[test]
    fn the_cap_counts_status_and_headers_too() {
        let headers: Vec<(String, String)> = (0..100)
            .map(|i| (format!("x-h{i:03}"), i.to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let differences = compare(
            &response(200, &pairs, "a"),
            &response(500, &[], "b"),
            &CompareSettings::default(),
        );
        assert_eq!(differences.len(), MAX_DIFFERENCES);
        assert_eq!(differences[0].path, "status");
        assert_eq!(differences[63].path, "header.x-h062");
    }

    #[test]
    fn deep_nesting_returns_without_panicking() {
        let nested =
            |depth: usize, leaf: &str| format!("{}{leaf}{}", "[".repeat(depth), "]".repeat(depth));
        // Past serde_json's recursion limit neither side is JSON: the bytes are compared.
        assert_eq!(
            paths(&compare_bodies(&nested(10_000, "1"), &nested(10_000, "2"))),
            ["body"]
        );
        assert_eq!(
            compare_bodies(&nested(10_000, "1"), &nested(10_000, "1")),
            []
        );

        // Within it, the walk stops at MAX_DEPTH and compares the rest whole.
        let differences = compare_bodies(&nested(100, "1"), &nested(100, "2"));
        let at_depth = format!("body{}", "[]".repeat(MAX_DEPTH));
        assert_eq!(
            differences,
            [difference(&at_depth, &nested(68, "1"), &nested(68, "2"))]
        );
        assert_eq!(compare_bodies(&nested(100, "1.0"), &nested(100, "1.0")), []);
    }

    /// A random JSON document from small sets of keys, strings and numbers, so that two
    /// documents often share parts. Floats are never integral, so no two numbers are equal
    /// as values but not as `Value`s.
    fn random_value(rng: &mut StdRng, depth: u32) -> Value {
        let kinds = if depth >= 4 { 5 } else { 7 };
        match rng.random_range(0..kinds) {
            0 => Value::Null,
            1 => json!(rng.random_bool(0.5)),
            2 => json!(rng.random_range(-3..4)),
            3 => json!(f64::from(rng.random_range(-3..4)) + 0.5),
            4 => json!(["", "a", "b", "é"][rng.random_range(0..4)]),
            5 => {
                let len = rng.random_range(0..5);
                Value::Array((0..len).map(|_| random_value(rng, depth + 1)).collect())
            }
            _ => {
                let len = rng.random_range(0..5);
                let object: Map<String, Value> = (0..len)
                    .map(|_| (random_key(rng), random_value(rng, depth + 1)))
                    .collect();
                Value::Object(object)
            }
        }
    }

    fn random_key(rng: &mut StdRng) -> String {
        ["id", "ts", "items", "price", "a b"][rng.random_range(0..5)].to_owned()
    }

    /// Changes one random place of a document (which may leave it equal).
    fn mutate(value: &mut Value, rng: &mut StdRng) {
        let descend = rng.random_bool(0.7);
        match value {
            Value::Array(elements) if descend && !elements.is_empty() => {
                let i = rng.random_range(0..elements.len());
                mutate(&mut elements[i], rng);
            }
            Value::Object(map) if descend && !map.is_empty() => {
                let i = rng.random_range(0..map.len());
                if let Some(child) = map.values_mut().nth(i) {
                    mutate(child, rng);
                }
            }
            Value::Array(elements) if rng.random_bool(0.5) => {
                if rng.random_bool(0.5) {
                    elements.pop();
                } else {
                    elements.push(random_value(rng, 3));
                }
            }
            Value::Object(map) if rng.random_bool(0.5) => {
                let key = random_key(rng);
                if map.remove(&key).is_none() {
                    map.insert(key, random_value(rng, 3));
                }
            }
            _ => *value = random_value(rng, 2),
        }
    }

    fn json_response(value: &Value) -> Captured {
        response(200, &[], &value.to_string())
    }

    #[test]
    fn random_documents_differ_exactly_when_their_values_do() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let none = CompareSettings::default();
        let mut differing = 0;
        for _ in 0..4000 {
            let served = random_value(&mut rng, 0);
            let mut copy = served.clone();
            for _ in 0..rng.random_range(1..4) {
                mutate(&mut copy, &mut rng);
            }
            let (served_response, copy_response) = (json_response(&served), json_response(&copy));
            assert_eq!(compare(&served_response, &served_response, &none), []);

            let differences = compare(&served_response, &copy_response, &none);
            assert!(differences.len() <= MAX_DIFFERENCES);
            if differences.len() < MAX_DIFFERENCES {
                assert_eq!(
                    differences.is_empty(),
                    served == copy,
                    "{served} vs {copy}: {differences:?}"
                );
            }
            differing += usize::from(!differences.is_empty());
            for difference in &differences {
                let path = &difference.path;
                assert!(
                    path.starts_with("body") || path.starts_with("header.") || path == "status",
                    "{path}"
                );
                assert!(
                    path.split('[').skip(1).all(|rest| rest.starts_with(']')),
                    "{path}"
                );
            }
            let mut distinct = paths(&differences);
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), differences.len());
        }
        assert!((1000..4000).contains(&differing), "{differing}");
    }
}
