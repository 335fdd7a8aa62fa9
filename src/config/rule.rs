//! The checks of a rule's parts, for `[[rule]]` in the file and for the rules of the shared
//! document (`[store]`) alike, so that both refuse the same rules in the same words. The
//! caller says where (the file's key and line, or the document's field).

use http::HeaderName;
use regex::Regex;

use super::diagnostics::regex_reason;

pub const BOTH_SOURCES: &str = "a rule reads either `header` or `cookie`, not both";
pub const NO_SOURCE: &str = "a rule needs `header = \"NAME\"` or `cookie = \"NAME\"`";
pub const NO_MATCHER: &str =
    "a rule needs one of `equals = \"VALUE\"`, `matches = \"REGEX\"` or `present = true`";
pub const PRESENT_FALSE: &str = "present must be true; omit the rule instead";

/// A second matcher given where `first` already is.
pub fn two_matchers(first: &str) -> String {
    format!("a rule takes only one of `equals`, `matches` or `present` (`{first}` is already set)")
}

/// A header name (lowercased), as rules and `proxy.user_id_header` read it.
pub fn header_name(name: &str) -> Result<HeaderName, String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

/// Cookie names are RFC 6265 tokens: visible ASCII except separators.
pub fn cookie_name(name: &str) -> Result<(), String> {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(is_tchar) {
        return Err(format!(
            "{name:?} is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~ only)"
        ));
    }
    Ok(())
}

/// A `matches` pattern.
pub fn pattern(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("invalid regex {pattern:?}: {}", regex_reason(&e)))
}
