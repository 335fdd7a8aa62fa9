use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A stage 1 or stage 2 failure before it is tied to a file: key path, byte span, message.
#[derive(Debug)]
pub(super) struct FieldError {
    pub(super) key: String,
    pub(super) span: Range<usize>,
    pub(super) message: String,
}

impl FieldError {
    pub(super) fn new(
        key: impl Into<String>,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            span,
            message: message.into(),
        }
    }

    pub(super) fn missing(key: impl Into<String>, table_span: Range<usize>) -> Self {
        Self::new(key, table_span, "required key is missing")
    }
}

/// For `key = some:thing` lines, the usual cause of a syntax error: a string without quotes.
pub(super) fn unquoted_string_hint(line: &str) -> Option<String> {
    let (key, value) = line.split_once('=')?;
    let (key, value) = (key.trim(), value.split(" #").next()?.trim());
    let starts_quoted = value.starts_with(['"', '\'', '[', '{']);
    let looks_textual =
        value.contains([':', '/']) || value.chars().any(|c| c.is_ascii_alphabetic());
    let is_keyword = matches!(value, "true" | "false" | "inf" | "nan");
    (!key.is_empty() && !value.is_empty() && !starts_quoted && looks_textual && !is_keyword)
        .then(|| format!(" (strings must be quoted: {key} = \"{value}\")"))
}

/// Of two keys that conflict, the one written later: that is the one that introduced the
/// conflict, so it is the one to blame.
pub(super) fn later<'a>(
    a: (&'a str, Range<usize>),
    b: (&'a str, Range<usize>),
) -> (&'a str, Range<usize>) {
    if a.1.start > b.1.start { a } else { b }
}

// ---------------------------------------------------------------------------------------------
// Locating errors: byte offsets to lines and key paths.

/// 1-based line of byte `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The deepest key path (`backend[1].urls[0]`) whose key or value span holds `offset`.
pub(super) fn key_path_at(root: &Spanned<DeTable<'_>>, offset: usize) -> Option<String> {
    let mut best = None;
    find_in_table(root.get_ref(), offset, "", 0, &mut best);
    best.map(|(_, path)| path)
}

fn holds(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

fn consider(best: &mut Option<(usize, String)>, depth: usize, path: &str) {
    if best.as_ref().is_none_or(|(d, _)| depth > *d) {
        *best = Some((depth, path.to_owned()));
    }
}

fn find_in_table(
    table: &DeTable<'_>,
    offset: usize,
    path: &str,
    depth: usize,
    best: &mut Option<(usize, String)>,
) {
    for (key, value) in table.iter() {
        let child = join_key(path, key.get_ref());
        if holds(&key.span(), offset) || holds(&value.span(), offset) {
            consider(best, depth + 1, &child);
        }
        find_in_value(value, offset, &child, depth + 1, best);
    }
}

fn find_in_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    path: &str,
    depth: usize,
    best: &mut Option<(usize, String)>,
) {
    match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, offset, path, depth, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let child = format!("{path}[{i}]");
                if holds(&item.span(), offset) {
                    consider(best, depth + 1, &child);
                }
                find_in_value(item, offset, &child, depth + 1, best);
            }
        }
        _ => {}
    }
}

/// Appends `key` to a dotted path, quoting it when it is not a bare TOML key.
fn join_key(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// Fallback for syntax errors the partial parse does not cover (a duplicate key, a broken
/// table header): read the key off the error's line, inside the table whose `[header]`
/// precedes it.
pub(super) fn key_path_from_line(
    root: &Spanned<DeTable<'_>>,
    text: &str,
    offset: usize,
) -> Option<String> {
    let (line_start, line) = line_around(text, offset);
    let line = line.trim();
    if let Some(header) = line.strip_prefix('[') {
        let name = header.trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace());
        return (!name.is_empty()).then(|| name.to_owned());
    }
    let key = line.split('=').next()?.split('#').next()?.trim();
    if key.is_empty() {
        return None;
    }
    let mut enclosing: Option<(usize, String)> = None;
    find_header_before(root.get_ref(), text, line_start, "", &mut enclosing);
    Some(match enclosing {
        Some((_, table)) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}

/// The line holding byte `offset`: its start offset and its text, without the newline.
pub(super) fn line_around(text: &str, offset: usize) -> (usize, &str) {
    let bytes = text.as_bytes();
    let offset = offset.min(bytes.len());
    let start = bytes[..offset]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let end = bytes[offset..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| offset + i);
    (start, text.get(start..end).unwrap_or_default())
}

/// The path of the `[table]` or `[[array]]` header that starts last before `before`.
fn find_header_before(
    table: &DeTable<'_>,
    text: &str,
    before: usize,
    path: &str,
    best: &mut Option<(usize, String)>,
) {
    let visit = |value: &Spanned<DeValue<'_>>, path: String, best: &mut Option<_>| {
        if let DeValue::Table(inner) = value.get_ref() {
            let start = value.span().start;
            let is_header = text.get(start..).is_some_and(|s| s.starts_with('['));
            if is_header && start < before && best.as_ref().is_none_or(|(s, _)| start > *s) {
                *best = Some((start, path.clone()));
            }
            find_header_before(inner, text, before, &path, best);
        }
    };
    for (key, value) in table.iter() {
        let child = join_key(path, key.get_ref());
        if let DeValue::Array(items) = value.get_ref() {
            for (i, item) in items.iter().enumerate() {
                visit(item, format!("{child}[{i}]"), best);
            }
        } else {
            visit(value, child, best);
        }
    }
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into the config's words,
/// with a suggestion when the key looks like a typo of an allowed one.
pub(super) fn describe_unknown_key(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, rest) = rest.split_once('`')?;
    let allowed: Vec<&str> = rest
        .strip_prefix(", expected ")
        .map(|list| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let mut described = "unknown key".to_owned();
    if let Some(suggestion) = closest(unknown, &allowed) {
        described.push_str(&format!(" (did you mean `{suggestion}`?)"));
    }
    if allowed.is_empty() {
        described.push_str("; this table takes no keys");
    } else {
        described.push_str(&format!("; allowed keys here: {}", allowed.join(", ")));
    }
    Some(described)
}

/// The allowed key `unknown` is most likely a typo of, if any is close enough.
fn closest<'a>(unknown: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let normalized = unknown.to_ascii_lowercase().replace('-', "_");
    let max_distance = if normalized.chars().count() <= 3 {
        1
    } else {
        2
    };
    allowed
        .iter()
        .map(|&candidate| (edit_distance(&normalized, candidate), candidate))
        .filter(|&(distance, _)| distance <= max_distance)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance where swapping two adjacent characters costs 1 (`weigth` -> `weight`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// The gist of a regex error on one line: its multi-line caret display ends in `error: WHY`.
pub(super) fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    match text
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
    {
        Some(reason) => reason.to_owned(),
        None => one_line(&text).into_owned(),
    }
}

/// Error messages are printed after `file:line: key:`, so keep them on that line.
pub(super) fn one_line(message: &str) -> std::borrow::Cow<'_, str> {
    if message.contains('\n') {
        message
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .into()
    } else {
        message.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_only_for_near_misses() {
        assert_eq!(closest("weigth", &["name", "weight"]), Some("weight"));
        assert_eq!(
            closest("connect-timeout", &["connect_timeout"]),
            Some("connect_timeout")
        );
        assert_eq!(closest("colour", &["name", "weight"]), None);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
