//! `canary-proxy mirror status`: the report of `GET /admin/mirror` as a table a person can
//! read (pure: JSON in, text out).

use serde_json::Value;

use crate::rollout::view::{group_digits, text};

/// Examples shown, the newest.
const SHOWN_EXAMPLES: usize = 5;
/// Paths shown, the most frequent.
const SHOWN_PATHS: usize = 15;

/// The report as text, laid out for `width` columns.
pub fn render(report: &Value, width: usize) -> String {
    let Some(config) = report.get("config").filter(|c| !c.is_null()) else {
        return "mirroring is off (PUT /admin/mirror or [mirror] in the config starts it)\n"
            .to_owned();
    };
    let mut out = String::new();
    let methods: Vec<&str> = config["methods"]
        .as_array()
        .map(|m| m.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let source = match config["from"].as_str() {
        Some(from) => format!("{from}'s"),
        None => "the other backends'".to_owned(),
    };
    out.push_str(&format!(
        "mirroring {} → {} ({}% of {source} requests), comparison {}\n",
        methods.join(", "),
        text(&config["backend"]),
        number(&config["percent"]),
        if config["compare"] == true {
            "on"
        } else {
            "off"
        },
    ));
    let counts = &report["counts"];
    let count = |key: &str| counts[key].as_u64().unwrap_or(0);
    let compared = count("compared");
    out.push_str(&format!(
        "  copied {}   compared {}   identical {}   different {} ({:.2}%)\n",
        group_digits(count("copied")),
        group_digits(compared),
        group_digits(count("identical")),
        group_digits(count("different")),
        100.0 * count("different") as f64 / compared.max(1) as f64,
    ));
    out.push_str(&format!(
        "  skipped: method {}, body {}, percent {}   dropped {}   errors {}   timeouts {}\n",
        group_digits(count("skipped_method")),
        group_digits(count("skipped_body")),
        group_digits(count("skipped_percent")),
        group_digits(count("dropped")),
        group_digits(count("errors")),
        group_digits(count("timeouts")),
    ));
    let paths = report["paths"].as_array().cloned().unwrap_or_default();
    if !paths.is_empty() {
        let column = width.saturating_sub(34).clamp(16, 60);
        out.push_str(&format!(
            "\n{:<column$}  {:>9}  {:>7}  canary difference\n",
            "differing path", "different", "noise"
        ));
        for path in paths.iter().take(SHOWN_PATHS) {
            out.push_str(&format!(
                "{:<column$}  {:>9}  {:>7}  {}\n",
                cut(&text(&path["path"]), column),
                group_digits(path["different"].as_u64().unwrap_or(0)),
                group_digits(path["noise"].as_u64().unwrap_or(0)),
                if path["reported"] == true {
                    "yes"
                } else {
                    "no (noise)"
                },
            ));
        }
    }
    let examples = report["examples"].as_array().cloned().unwrap_or_default();
    if !examples.is_empty() {
        out.push_str("\nlast differences (newest first)\n");
        let value_width = width.saturating_sub(8) / 2;
        for example in examples.iter().take(SHOWN_EXAMPLES) {
            out.push_str(&format!(
                "  {} {}  {}  served {}, copy {}\n",
                text(&example["method"]),
                cut(&text(&example["path"]), width / 2),
                text(&example["request_id"]),
                example["served_status"],
                example["copy_status"],
            ));
            for difference in example["differences"].as_array().into_iter().flatten() {
                out.push_str(&format!("    {}\n", text(&difference["path"])));
                out.push_str(&format!(
                    "      served {}\n      copy   {}\n",
                    cut(&text(&difference["served"]), value_width),
                    cut(&text(&difference["copy"]), value_width),
                ));
            }
        }
    }
    out
}

fn number(value: &Value) -> String {
    match value.as_f64() {
        Some(n) if n.fract() == 0.0 => format!("{n:.0}"),
        Some(n) => format!("{n}"),
        None => "?".to_owned(),
    }
}

/// At most `width` characters, the last one `…` when cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn off_says_how_to_start() {
        let shown = render(&json!({"version": 3, "config": null}), 80);
        assert!(shown.starts_with("mirroring is off"), "{shown}");
    }

    #[test]
    fn a_report_reads_as_a_table() {
        let report = json!({
            "version": 4,
            "config": {"backend": "v2", "percent": 100.0, "methods": ["GET", "HEAD"],
                       "compare": true},
            "counts": {"copied": 1234, "compared": 1200, "identical": 1150, "different": 50,
                       "skipped_method": 12, "skipped_body": 0, "skipped_percent": 0,
                       "dropped": 0, "errors": 3, "timeouts": 1},
            "paths": [
                {"path": "body.items[].price", "different": 50, "noise": 0, "reported": true},
                {"path": "body.ts", "different": 900, "noise": 880, "reported": false},
            ],
            "examples": [{"method": "GET", "path": "/items?page=3", "request_id": "req-3",
                          "served_status": 200, "copy_status": 200,
                          "differences": [{"path": "body.items[].price", "served": "10",
                                           "copy": "12"}]}],
        });
        let shown = render(&report, 80);
        assert!(
            shown.starts_with(
                "mirroring GET, HEAD → v2 (100% of the other backends' requests), comparison on\n"
            ),
            "{shown}"
        );
        assert!(
            shown
                .contains("copied 1,234   compared 1,200   identical 1,150   different 50 (4.17%)"),
            "{shown}"
        );
        assert!(shown.contains("errors 3   timeouts 1"), "{shown}");
        let price = shown
            .lines()
            .find(|l| l.starts_with("body.items[].price"))
            .unwrap();
        assert!(price.ends_with("50        0  yes"), "{price:?}");
        let ts = shown.lines().find(|l| l.starts_with("body.ts")).unwrap();
        assert!(ts.ends_with("no (noise)"), "{ts:?}");
        assert!(
            shown.contains("  GET /items?page=3  req-3  served 200, copy 200\n"),
            "{shown}"
        );
        assert!(
            shown.contains("      served 10\n      copy   12\n"),
            "{shown}"
        );
        assert!(render(&report, 20).lines().all(|l| l.chars().count() < 120));
        let mut from = report.clone();
        from["config"]["from"] = json!("v1");
        assert!(
            render(&from, 80).starts_with("mirroring GET, HEAD → v2 (100% of v1's requests)"),
            "{}",
            render(&from, 80)
        );
    }

    #[test]
    fn long_values_are_cut() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
    }
}
