//! The terminal view of a rollout, drawn from the JSON of `GET /admin/rollout` (what
//! `canary-proxy rollout status` prints and `--watch` redraws): the steps as a progress bar
//! with the current one marked, baseline and canary side by side, each verdict with its
//! interval, and the history, newest last. Pure: JSON and a width in, text out; a field that
//! is missing or null shows as "—", so a proxy of another version still gets a view.
//!
//! Colour is optional and never the only carrier of meaning: every state and verdict is also
//! a word and a symbol (✓ pass, ✗ fail, ? inconclusive), and the current step is marked by a
//! caret under it, so the view reads the same in black and white or to a colour-blind eye.

use std::fmt::Write as _;

use serde_json::Value;

use crate::utc::civil_from_days;

/// The narrowest view laid out; narrower terminals wrap it.
const MIN_WIDTH: usize = 60;
/// History lines shown; older ones are counted.
const HISTORY_SHOWN: usize = 10;
/// Width of the row labels of the two tables.
const LABEL: usize = 20;
/// Width of the first column of the two tables.
const COLUMN: usize = 26;

/// ANSI styles, used only when the output is a terminal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tone {
    Good,
    Bad,
    Wait,
    Active,
    Strong,
    Faint,
}

impl Tone {
    fn sgr(self) -> &'static str {
        match self {
            Tone::Good => "1;32",
            Tone::Bad => "1;31",
            Tone::Wait => "1;33",
            Tone::Active => "1;36",
            Tone::Strong => "1",
            Tone::Faint => "2",
        }
    }
}

struct Painter {
    color: bool,
}

impl Painter {
    fn paint(&self, text: &str, tone: Tone) -> String {
        if self.color {
            format!("\x1b[{}m{text}\x1b[0m", tone.sgr())
        } else {
            text.to_string()
        }
    }

    /// The heading of a two-column table: the label faint, the columns' names strong.
    fn heading(&self, out: &mut String, label: &str, left: &str, right: &str) {
        let _ = writeln!(
            out,
            "{}{}{}",
            self.cell(label, Some(Tone::Faint), LABEL),
            self.cell(left, Some(Tone::Strong), COLUMN),
            self.paint(right, Tone::Strong)
        );
    }

    /// A row of a two-column table: the label and the left cell padded, the right one as it
    /// is (painted already, if at all).
    fn row(&self, out: &mut String, label: &str, left: &str, right: &str) {
        let _ = writeln!(
            out,
            "{}{}{right}",
            self.cell(label, None, LABEL),
            self.cell(left, None, COLUMN)
        );
    }

    /// `text` painted, then padded with spaces to `width` visible characters.
    fn cell(&self, text: &str, tone: Option<Tone>, width: usize) -> String {
        let pad = width.saturating_sub(text.chars().count());
        let shown = tone.map_or_else(|| text.to_string(), |t| self.paint(text, t));
        format!("{shown}{}", " ".repeat(pad))
    }
}

/// The whole view, at most `width` columns wide (but never narrower than 60), with ANSI
/// colours when `color`.
pub fn render(status: &Value, width: usize, color: bool) -> String {
    let width = width.max(MIN_WIDTH);
    let p = Painter { color };
    let mut out = String::new();
    header(&mut out, status, &p, width);
    steps(&mut out, status, &p, width);
    out.push('\n');
    versions(&mut out, status, &p);
    out.push('\n');
    verdicts(&mut out, status, &p);
    out.push('\n');
    if shadow(&mut out, status, &p) {
        out.push('\n');
    }
    history(&mut out, status, &p, width);
    out
}

/// One line: the state, the step and the traffic, as the rollout commands print it.
pub fn summary(status: &Value) -> String {
    let state = text(&status["state"]);
    let mut line = state_words(&state).to_string();
    let steps = steps_of(status);
    if in_shadow_stage(status) {
        line.push_str(", before step 1");
    } else if let Some(step) = status["step"].as_u64()
        && !steps.is_empty()
        && state != "idle"
    {
        let _ = write!(line, ", step {} of {}", step + 1, steps.len());
    }
    if let Some(percent) = status["canary_percent"].as_u64() {
        let (canary, baseline) = names(status);
        let _ = write!(
            line,
            ": canary {canary} {percent}%, baseline {baseline} {}%",
            100u64.saturating_sub(percent)
        );
    }
    line
}

/// True once the rollout is over (`promoted` or `rolled_back`): a watch stops there.
pub fn is_final(status: &Value) -> bool {
    matches!(status["state"].as_str(), Some("promoted" | "rolled_back"))
}

fn header(out: &mut String, status: &Value, p: &Painter, width: usize) {
    let (canary, baseline) = names(status);
    let title = format!("rollout {baseline} → {canary}");
    let state = text(&status["state"]);
    let (symbol, tone) = state_mark(&state);
    let shown = format!("{symbol} {}", state_words(&state));
    let gap = width
        .saturating_sub(title.chars().count() + shown.chars().count())
        .max(2);
    let _ = writeln!(
        out,
        "{}{}{}",
        p.paint(&title, Tone::Strong),
        " ".repeat(gap),
        p.paint(&shown, tone)
    );
}

/// The progress bar, the caret under the current step, and a line on where the step stands.
fn steps(out: &mut String, status: &Value, p: &Painter, width: usize) {
    let steps = steps_of(status);
    let state = text(&status["state"]);
    let step = status["step"].as_u64().map(|s| s as usize);
    if steps.is_empty() {
        let _ = writeln!(out, "steps   —");
        return;
    }
    // A shadow stage is a label of its own before the steps.
    let offset = usize::from(status["shadow"].is_object());
    let shadowed = in_shadow_stage(status);
    // Segments into a step are heavy once its traffic has been set.
    let reached = match (state.as_str(), step) {
        ("promoted", _) => steps.len() - 1 + offset,
        ("idle", _) | (_, None) => 0,
        _ if shadowed => 0,
        ("waiting_approval", Some(s)) => (s + offset).saturating_sub(1),
        (_, Some(s)) => s + offset,
    };
    let current = match state.as_str() {
        "idle" => None,
        "promoted" => Some(steps.len() - 1 + offset),
        _ if shadowed => Some(0),
        _ => step.map(|s| s.min(steps.len() - 1) + offset),
    };
    let labels: Vec<String> = (offset == 1)
        .then(|| "[shadow]".to_string())
        .into_iter()
        .chain(steps.iter().map(|s| format!("[{s}%]")))
        .collect();
    let indent = "steps   ";
    let used: usize = indent.len() + labels.iter().map(|l| l.chars().count()).sum::<usize>();
    let segment = if labels.len() > 1 {
        (width.saturating_sub(used) / (labels.len() - 1)).clamp(2, 10)
    } else {
        0
    };
    let mut bar = indent.to_string();
    let mut caret_at = None;
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            let line = if i <= reached && state != "idle" {
                "━"
            } else {
                "─"
            };
            bar.push_str(&line.repeat(segment));
        }
        if Some(i) == current {
            caret_at = Some(bar.chars().count() + label.chars().count() / 2);
            bar.push_str(&p.paint(label, state_mark(&state).1));
        } else {
            bar.push_str(label);
        }
    }
    let approve = numbers(&status["approve"]);
    if !approve.is_empty() {
        let list: Vec<String> = approve.iter().map(|a| format!("{a}%")).collect();
        let _ = write!(bar, "  approval before {}", list.join(", "));
    }
    let _ = writeln!(out, "{bar}");
    if let Some(at) = caret_at {
        let (mark, tone) = match state.as_str() {
            "promoted" => ("▲ promoted", Tone::Good),
            "rolled_back" => ("▲ rolled back here", Tone::Bad),
            "waiting_approval" => ("▲ waits for approval", Tone::Wait),
            "paused" => ("▲ paused here", Tone::Wait),
            _ => ("▲ now", Tone::Active),
        };
        let _ = writeln!(out, "{}{}", " ".repeat(at), p.paint(mark, tone));
    }
    for line in wrap(&step_line(status, &state, &steps), width - 8) {
        let _ = writeln!(out, "        {line}");
    }
}

fn step_line(status: &Value, state: &str, steps: &[u64]) -> String {
    let (canary, baseline) = names(status);
    let percent = status["canary_percent"]
        .as_u64()
        .map_or("—".to_string(), |c| format!("{c}%"));
    let step = status["step"].as_u64().map_or(0, |s| s as usize);
    let elapsed = status["step_elapsed_s"]
        .as_f64()
        .map_or("—".to_string(), seconds);
    let step_time = text(&status["step_time"]);
    let min = status["min_requests"]
        .as_u64()
        .map_or("—".to_string(), group_digits);
    let position = format!("step {} of {}", step + 1, steps.len());
    if in_shadow_stage(status) {
        let shadow = &status["shadow"];
        let pairs = shadow["pairs"]
            .as_u64()
            .map_or("—".to_string(), group_digits);
        let duration = Some(text(&shadow["duration"]))
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "—".to_owned());
        return match state {
            "rolled_back" => {
                format!("rolled back in the shadow stage: no user reached canary {canary}")
            }
            "paused" => "the shadow stage is paused: canary-proxy rollout resume".to_string(),
            _ => format!(
                "shadow stage for {elapsed}: canary {canary} gets copies only ({pairs} paired); \
                 needs {duration}, {min} pairs"
            ),
        };
    }
    match state {
        "idle" => "not started: canary-proxy rollout start".to_string(),
        "running" => format!(
            "{position} at canary {percent} for {elapsed}; needs {step_time}, {min} requests \
             per version"
        ),
        "paused" => format!("{position}: canary {percent} held; canary-proxy rollout resume"),
        "waiting_approval" => format!(
            "canary {percent} until step {} ({}%) is approved: canary-proxy rollout resume",
            step + 1,
            steps.get(step).copied().unwrap_or(100)
        ),
        "promoted" => format!("canary {canary} takes all of the pair's traffic"),
        "rolled_back" => format!("baseline {baseline} takes all of the pair's traffic again"),
        _ => format!("canary {percent}"),
    }
}

/// Baseline and canary side by side: the counts of the current step.
fn versions(out: &mut String, status: &Value, p: &Painter) {
    let (canary, baseline) = names(status);
    let (b, c) = (&status["baseline"], &status["canary"]);
    let percent = status["canary_percent"].as_u64();
    let row = |out: &mut String, label: &str, left: String, right: String| {
        p.row(out, label, &left, &right);
    };
    p.heading(
        out,
        "at this step",
        &format!("baseline {baseline}"),
        &format!("canary {canary}"),
    );
    row(
        out,
        "traffic",
        percent.map_or("—".into(), |c| format!("{}%", 100u64.saturating_sub(c))),
        percent.map_or("—".into(), |c| format!("{c}%")),
    );
    let requests = |v: &Value| v["requests"].as_u64().map_or("—".into(), group_digits);
    row(out, "requests", requests(b), requests(c));
    let errors = |v: &Value| match (v["errors"].as_u64(), v["error_rate"].as_f64()) {
        (Some(n), Some(rate)) => format!("{} ({:.2}%)", group_digits(n), rate * 100.0),
        (Some(n), None) => group_digits(n),
        _ => "—".into(),
    };
    row(out, "errors", errors(b), errors(c));
    row(out, "p50", millis(&b["p50_ms"]), millis(&c["p50_ms"]));
    row(out, "p99", millis(&b["p99_ms"]), millis(&c["p99_ms"]));
    let interval = |v: &Value| {
        format!(
            "[{}, {}] ms",
            number(&v[0], 2, false),
            number(&v[1], 2, false)
        )
    };
    let intervals = &status["intervals"];
    row(
        out,
        "p99 interval",
        interval(&intervals["baseline_p99_ms"]),
        interval(&intervals["canary_p99_ms"]),
    );
}

/// The two verdicts, each with its interval and, when the proxy says it, the tolerance.
fn verdicts(out: &mut String, status: &Value, p: &Painter) {
    let intervals = &status["intervals"];
    let verdict = |metric: &str| {
        let word = intervals[metric]["verdict"]
            .as_str()
            .or_else(|| status["verdict"][metric].as_str())
            .unwrap_or("—")
            .to_string();
        let (symbol, tone) = verdict_mark(&word);
        (format!("{symbol} {word}"), tone)
    };
    let (errors, errors_tone) = verdict("errors");
    let (latency, latency_tone) = verdict("latency");
    p.heading(out, "verdict", "errors", "latency (p99)");
    let _ = writeln!(
        out,
        "{}{}{}",
        p.cell("", None, LABEL),
        p.cell(&errors, errors_tone, COLUMN),
        latency_tone.map_or(latency.clone(), |t| p.paint(&latency, t))
    );
    let e = &intervals["errors"];
    let l = &intervals["latency"];
    let _ = writeln!(
        out,
        "{}{}{}",
        p.cell("canary vs baseline", None, LABEL),
        p.cell(
            &format!(
                "{} to {} points",
                points(&e["low"], true),
                points(&e["high"], true)
            ),
            None,
            COLUMN
        ),
        format_args!("{} to {}", times(&l["low"]), times(&l["high"]))
    );
    let analysis = &status["analysis"];
    if analysis.is_object() {
        let _ = writeln!(
            out,
            "{}{}{}",
            p.cell("tolerance", None, LABEL),
            p.cell(
                &format!("{} points", points(&analysis["error_tolerance"], true)),
                None,
                COLUMN
            ),
            format_args!(
                "{}x",
                analysis["latency_tolerance"]
                    .as_f64()
                    .map_or("—".to_string(), |t| format!("{:.2}", 1.0 + t))
            )
        );
    }
}

/// The shadow stage's counts and its differences verdict, when the plan has one; whether
/// anything was written.
fn shadow(out: &mut String, status: &Value, p: &Painter) -> bool {
    let shadow = &status["shadow"];
    if !shadow.is_object() {
        return false;
    }
    let count = |key: &str| shadow[key].as_u64().map_or("—".to_string(), group_digits);
    let verdict = shadow["differences"]["verdict"].as_str().unwrap_or("—");
    let (symbol, tone) = verdict_mark(verdict);
    p.heading(out, "shadow stage", "copies paired", "differences");
    let shown = format!("{symbol} {verdict}");
    p.row(
        out,
        "",
        &count("pairs"),
        &tone.map_or(shown.clone(), |t| p.paint(&shown, t)),
    );
    p.row(
        out,
        "only one failed",
        &format!(
            "{} copies, {} served",
            count("copy_only_errors"),
            count("served_only_errors")
        ),
        &format!("{} of {} compared", count("different"), count("compared")),
    );
    let differences = &shadow["differences"];
    p.row(
        out,
        "interval",
        "",
        &format!(
            "{} to {} %, at most {} %",
            points(&differences["low"], false),
            points(&differences["high"], false),
            points(&shadow["max_diff_rate"], false)
        ),
    );
    true
}

/// Whether the rollout is in its shadow stage, or ended there.
fn in_shadow_stage(status: &Value) -> bool {
    status["shadow"]["before_step_1"].as_bool() == Some(true)
}

/// The history, newest last; the reason wraps within `width`.
fn history(out: &mut String, status: &Value, p: &Painter, width: usize) {
    let entries = status["history"].as_array().map_or(&[][..], Vec::as_slice);
    let steps = steps_of(status);
    let skipped = entries.len().saturating_sub(HISTORY_SHOWN);
    let shown = &entries[skipped..];
    let days: Vec<Option<u64>> = shown
        .iter()
        .map(|e| e["at"].as_u64().map(|ms| ms / 86_400_000))
        .collect();
    let with_date = days.windows(2).any(|w| w[0] != w[1]);
    let time_width = if with_date { 14 } else { 8 };
    let _ = writeln!(
        out,
        "{}",
        p.paint(
            &format!(
                "history (UTC){}",
                if skipped > 0 {
                    format!(", {skipped} earlier not shown")
                } else {
                    String::new()
                }
            ),
            Tone::Faint
        )
    );
    if shown.is_empty() {
        let _ = writeln!(out, "  —");
        return;
    }
    // time, event, step, canary %, then the reason.
    let reason_at = 2 + time_width + 2 + 18 + 5 + 1 + 5 + 2;
    let reason_width = width.saturating_sub(reason_at).max(20);
    for entry in shown {
        let time = entry["at"]
            .as_u64()
            .map_or("—".to_string(), |ms| utc_time(ms, with_date));
        let event = text(&entry["event"]).replace('_', " ");
        let tone = match entry["event"].as_str() {
            Some("promoted") => Some(Tone::Good),
            Some("rolled_back" | "aborted") => Some(Tone::Bad),
            Some("awaiting_approval" | "paused" | "held") => Some(Tone::Wait),
            _ => None,
        };
        // The shadow stage is "step 0".
        let shadowed = entry["shadow"].as_bool() == Some(true);
        let step = entry["step"].as_u64().map_or("—".to_string(), |s| {
            let s = if shadowed { s } else { s + 1 };
            if steps.is_empty() {
                format!("{s}")
            } else {
                format!("{s}/{}", steps.len())
            }
        });
        let percent = entry["canary_percent"]
            .as_u64()
            .map_or("—".to_string(), |c| format!("{c}%"));
        let reason = wrap(&text(&entry["reason"]), reason_width);
        let _ = write!(
            out,
            "  {}  {}{:>5} {:>5}  ",
            p.cell(&time, None, time_width),
            p.cell(&event, tone, 18),
            step,
            percent
        );
        for (i, line) in reason.iter().enumerate() {
            if i > 0 {
                out.push_str(&" ".repeat(reason_at));
            }
            out.push_str(line);
            out.push('\n');
        }
    }
}

/// A verdict's symbol (never the only carrier of its meaning: the word goes beside it) and
/// colour.
fn verdict_mark(verdict: &str) -> (&'static str, Option<Tone>) {
    match verdict {
        "pass" => ("✓", Some(Tone::Good)),
        "fail" => ("✗", Some(Tone::Bad)),
        "inconclusive" => ("?", Some(Tone::Wait)),
        _ => (" ", None),
    }
}

fn state_mark(state: &str) -> (&'static str, Tone) {
    match state {
        "idle" => ("○", Tone::Strong),
        "shadow" => ("◐", Tone::Active),
        "running" => ("▶", Tone::Active),
        "waiting_approval" => ("‖", Tone::Wait),
        "paused" => ("‖", Tone::Wait),
        "promoted" => ("✓", Tone::Good),
        "rolled_back" => ("✗", Tone::Bad),
        _ => ("?", Tone::Strong),
    }
}

fn state_words(state: &str) -> &str {
    match state {
        "waiting_approval" => "waiting for approval",
        "shadow" => "in the shadow stage",
        "rolled_back" => "rolled back",
        "" => "—",
        other => other,
    }
}

/// (canary, baseline) names; "canary"/"baseline" when the JSON has none.
fn names(status: &Value) -> (String, String) {
    let name = |key: &str, fallback: &str| {
        status[key]
            .as_str()
            .map_or_else(|| fallback.to_string(), str::to_string)
    };
    (name("canary_name", "?"), name("baseline_name", "?"))
}

fn steps_of(status: &Value) -> Vec<u64> {
    numbers(&status["steps"])
}

fn numbers(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// A JSON value as text: a string as it is, null as nothing, anything else as JSON.
pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A number with `decimals`, "—" when null or missing; `signed` adds the + of positives.
fn number(value: &Value, decimals: usize, signed: bool) -> String {
    match value.as_f64() {
        Some(x) if signed => format!("{x:+.decimals$}"),
        Some(x) => format!("{x:.decimals$}"),
        None => "—".to_string(),
    }
}

/// A ratio: 1.5 -> "1.50x", "—" when null or missing.
fn times(value: &Value) -> String {
    value
        .as_f64()
        .map_or("—".to_string(), |x| format!("{x:.2}x"))
}

/// A fraction as percentage points: 0.005 -> "+0.50".
fn points(value: &Value, signed: bool) -> String {
    number(&value.as_f64().map(|x| x * 100.0).into(), 2, signed)
}

/// Milliseconds with about three significant digits: "0.52 ms", "45.2 ms", "1.25 s".
fn millis(value: &Value) -> String {
    match value.as_f64() {
        None => "—".to_string(),
        Some(ms) if ms >= 1000.0 => format!("{:.2} s", ms / 1000.0),
        Some(ms) if ms >= 100.0 => format!("{ms:.0} ms"),
        Some(ms) if ms >= 10.0 => format!("{ms:.1} ms"),
        Some(ms) => format!("{ms:.2} ms"),
    }
}

/// 1234567 -> "1,234,567".
pub(crate) fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// Whole seconds: "7s", "1m05s", "2h03m".
fn seconds(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Unix milliseconds as UTC `HH:MM:SS`, with `MM-DD ` before it when `with_date`.
fn utc_time(ms: u64, with_date: bool) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    if !with_date {
        return format!("{h:02}:{m:02}:{s:02}");
    }
    let (_, month, day) = civil_from_days(secs / 86_400);
    format!("{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
}

/// Words of `text` in lines of at most `width` characters (a longer word gets a line).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let Some(line) = lines.last_mut() else { break };
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A running rollout at its second step, as `GET /admin/rollout` answers it.
    fn running() -> Value {
        json!({
            "state": "running", "step": 1, "steps": [10, 50, 100], "approve": [],
            "canary_percent": 50, "baseline_name": "v1", "canary_name": "v2",
            "step_elapsed_s": 7.4, "step_time": "10s", "min_requests": 100,
            "baseline": {"requests": 1234, "errors": 1, "error_rate": 0.00081, "p50_ms": 0.52, "p99_ms": 2.5728},
            "canary": {"requests": 1201, "errors": 0, "error_rate": 0.0, "p50_ms": 0.56, "p99_ms": 4.4544},
            "verdict": {"errors": "pass", "latency": "inconclusive"},
            "intervals": {
                "errors": {"verdict": "pass", "low": -0.0125, "high": 0.0075},
                "latency": {"verdict": "inconclusive", "low": 0.21, "high": null},
                "canary_p99_ms": [0.624, null],
                "baseline_p99_ms": [0.592, 3.1],
                "pairs": {"rollout": 1400, "step": 1100}
            },
            "analysis": {"interval": "1s", "error_tolerance": 0.05, "latency_tolerance": 1.0},
            "history": [
                {"at": 1_700_000_000_000u64, "event": "started", "state": "running", "step": 0, "canary_percent": 10, "reason": "started by the operator"},
                {"at": 1_700_000_012_500u64, "event": "advanced", "state": "running", "step": 1, "canary_percent": 50, "reason": "step 1 passed"}
            ]
        })
    }

    fn width_of(view: &str) -> usize {
        view.lines().map(|l| l.chars().count()).max().unwrap_or(0)
    }

    #[test]
    fn a_running_rollout_shows_steps_versions_verdicts_and_history_in_80_columns() {
        let view = render(&running(), 80, false);
        println!("{view}");
        assert!(width_of(&view) <= 80, "{view}");
        assert!(view.contains("rollout v1 → v2"), "{view}");
        assert!(view.contains("▶ running"), "{view}");
        assert!(
            view.contains("[10%]━━━━━━━━━━[50%]──────────[100%]"),
            "{view}"
        );
        // The caret sits under the current step's label.
        let lines: Vec<&str> = view.lines().collect();
        let bar = lines.iter().position(|l| l.contains("[50%]")).unwrap();
        let label_at = lines[bar].chars().collect::<Vec<_>>();
        let caret = lines[bar + 1].chars().position(|c| c == '▲').unwrap();
        assert_eq!(
            label_at[caret - 2..caret + 3].iter().collect::<String>(),
            "[50%]"
        );
        assert!(lines[bar + 1].contains("▲ now"));
        assert!(
            view.contains("step 2 of 3 at canary 50% for 7s; needs 10s, 100 requests per version"),
            "{view}"
        );
        assert!(view.contains("baseline v1") && view.contains("canary v2"));
        let row = |label: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(label))
                .unwrap()
                .to_string()
        };
        assert_eq!(row("traffic"), format!("{:20}{:26}50%", "traffic", "50%"));
        assert!(row("requests").contains("1,234") && row("requests").contains("1,201"));
        assert!(row("errors").contains("1 (0.08%)") && row("errors").contains("0 (0.00%)"));
        assert!(row("p99  ").contains("2.57 ms") && row("p99  ").contains("4.45 ms"));
        assert!(row("p99 interval").contains("[0.59, 3.10] ms"));
        assert!(row("p99 interval").contains("[0.62, —] ms"));
        assert!(view.contains("✓ pass") && view.contains("? inconclusive"));
        let versus = row("canary vs baseline");
        assert!(versus.contains("-1.25 to +0.75 points"), "{versus}");
        assert!(versus.contains("0.21x to —"), "{versus}");
        let tolerance = row("tolerance");
        assert!(tolerance.contains("+5.00 points") && tolerance.contains("2.00x"));
        assert!(view.contains("history (UTC)"));
        let started = view.find("22:13:20  started").unwrap();
        let advanced = view.find("22:13:32  advanced").unwrap();
        assert!(started < advanced, "newest last: {view}");
        assert!(view.contains("2/3   50%  step 1 passed"), "{view}");
        assert!(!view.contains('\x1b'), "no colour unless asked");
    }

    #[test]
    fn colour_adds_to_the_words_and_symbols_and_never_replaces_them() {
        let plain = render(&running(), 80, false);
        let coloured = render(&running(), 80, true);
        assert!(coloured.contains("\x1b[1;32m✓ pass"), "{coloured}");
        assert!(coloured.contains("\x1b[1;36m▶ running"));
        let stripped = strip_ansi(&coloured);
        assert_eq!(stripped, plain);
    }

    fn strip_ansi(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn a_rollback_marks_where_it_failed_and_the_failing_interval() {
        let mut status = running();
        status["state"] = json!("rolled_back");
        status["canary_percent"] = json!(0);
        status["step_elapsed_s"] = Value::Null;
        status["intervals"]["errors"] = json!({"verdict": "fail", "low": 0.0625, "high": 0.5});
        status["verdict"]["errors"] = json!("fail");
        status["history"].as_array_mut().unwrap().push(json!({
            "at": 1_700_000_016_000u64, "event": "rolled_back", "state": "rolled_back", "step": 1,
            "canary_percent": 0, "reason": "the errors verdict failed: the canary is worse"
        }));
        let view = render(&status, 80, false);
        println!("{view}");
        assert!(view.contains("✗ rolled back"), "{view}");
        assert!(view.contains("▲ rolled back here"));
        assert!(view.contains("✗ fail"));
        assert!(view.contains("+6.25 to +50.00 points"));
        assert!(view.contains("baseline v1 takes all of the pair's traffic again"));
        assert!(
            view.contains("rolled back         2/3    0%  the errors verdict failed"),
            "{view}"
        );
        assert!(is_final(&status));
        assert_eq!(
            summary(&status),
            "rolled back, step 2 of 3: canary v2 0%, baseline v1 100%"
        );
    }

    #[test]
    fn idle_promoted_and_waiting_read_as_such() {
        let mut status = running();
        status["state"] = json!("idle");
        status["history"] = json!([]);
        let view = render(&status, 80, false);
        assert!(
            view.contains("○ idle") && view.contains("not started"),
            "{view}"
        );
        assert!(view.contains("[10%]──────────[50%]"), "{view}");
        assert!(!view.contains('▲'));
        assert!(!is_final(&status));

        status["state"] = json!("promoted");
        status["step"] = json!(2);
        status["canary_percent"] = json!(100);
        let view = render(&status, 80, false);
        assert!(
            view.contains("[10%]━━━━━━━━━━[50%]━━━━━━━━━━[100%]"),
            "{view}"
        );
        assert!(view.contains("▲ promoted") && view.contains("✓ promoted"));
        assert!(is_final(&status));

        status["state"] = json!("waiting_approval");
        status["step"] = json!(1);
        status["canary_percent"] = json!(10);
        status["approve"] = json!([50]);
        let view = render(&status, 80, false);
        assert!(view.contains("[10%]──────────[50%]"), "{view}");
        assert!(view.contains("approval before 50%"));
        assert!(view.contains("▲ waits for approval"));
        assert!(view.contains("canary 10% until step 2 (50%) is approved"));
        assert_eq!(
            summary(&status),
            "waiting for approval, step 2 of 3: canary v2 10%, baseline v1 90%"
        );
    }

    #[test]
    fn a_shadow_stage_is_a_stage_of_its_own_before_step_1() {
        let mut status = running();
        status["state"] = json!("shadow");
        status["step"] = json!(0);
        status["canary_percent"] = json!(0);
        status["shadow"] = json!({
            "before_step_1": true, "duration": "30s", "max_diff_rate": 0.01, "pairs": 1234,
            "copy_only_errors": 3, "served_only_errors": 1, "compared": 1230, "different": 2,
            "difference_rate": 0.0016, "differences": {"verdict": "pass", "low": 0.0, "high": 0.0075},
        });
        status["history"] = json!([{"at": 1_700_000_000_000u64, "event": "started", "state": "shadow",
            "step": 0, "canary_percent": 0, "shadow": true, "reason": "started by the operator"}]);
        let view = render(&status, 80, false);
        println!("{view}");
        assert!(view.contains("◐ in the shadow stage"), "{view}");
        assert!(view.contains("started             0/3    0%"), "{view}");
        assert!(view.contains("[shadow]────"), "{view}");
        assert!(view.contains("▲ now"));
        assert!(
            view.contains("canary v2 gets copies only (1,234 paired)"),
            "{view}"
        );
        assert!(view.contains("3 copies, 1 served"), "{view}");
        assert!(view.contains("2 of 1,230 compared"), "{view}");
        assert!(view.contains("0.00 to 0.75 %, at most 1.00 %"), "{view}");
        assert!(view.lines().all(|l| l.chars().count() <= 80), "{view}");
        assert_eq!(
            summary(&status),
            "in the shadow stage, before step 1: canary v2 0%, baseline v1 100%"
        );
        // Rolled back there: the mark stays on the shadow stage.
        status["state"] = json!("rolled_back");
        let view = render(&status, 80, false);
        assert!(view.contains("no user reached canary v2"), "{view}");
        let caret = view
            .lines()
            .find(|l| l.contains("▲ rolled back here"))
            .unwrap_or("");
        assert!(caret.find('▲') < Some(16), "{view}");
        // Past it, the steps count from the label after it.
        status["state"] = json!("running");
        status["shadow"]["before_step_1"] = json!(false);
        status["canary_percent"] = json!(10);
        let view = render(&status, 80, false);
        assert!(view.contains("[shadow]━"), "{view}");
        assert!(view.contains("step 1 of 3"), "{view}");
    }

    #[test]
    fn missing_and_null_fields_show_as_dashes() {
        let view = render(&json!({"state": "running"}), 80, false);
        println!("{view}");
        assert!(view.contains("▶ running"));
        assert!(view.contains("steps   —"));
        assert!(view.contains("[—, —] ms"));
        assert!(view.contains("— to — points"));
        assert!(
            !view.contains("tolerance"),
            "shown only when the proxy says it"
        );
        // A 409's body has only the state: the summary still reads.
        assert_eq!(summary(&json!({"error": "x", "state": "idle"})), "idle");
    }

    #[test]
    fn long_histories_and_reasons_stay_within_the_width() {
        let mut status = running();
        let entries: Vec<Value> = (0..25)
            .map(|i| {
                json!({"at": 1_700_000_000_000u64 + i * 40_000_000, "event": "held", "state": "running",
                       "step": 0, "canary_percent": 10,
                       "reason": "step 1 still inconclusive after max_step_time (10m), and a long explanation that must wrap"})
            })
            .collect();
        status["history"] = Value::Array(entries);
        let view = render(&status, 80, false);
        assert!(width_of(&view) <= 80, "{view}");
        assert!(view.contains("15 earlier not shown"));
        // Entries over several days carry the date.
        assert!(view.contains("11-24 "), "{view}");
        assert_eq!(view.matches("  held ").count(), 10);
        // The reason wraps under itself.
        let at = view
            .lines()
            .find(|l| l.contains("  held "))
            .unwrap()
            .find("step 1")
            .unwrap();
        let next = view
            .lines()
            .skip_while(|l| !l.contains("  held "))
            .nth(1)
            .unwrap();
        assert_eq!(next.find(|c: char| c != ' '), Some(at), "{view}");
    }

    #[test]
    fn numbers_read_as_an_operator_expects() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(group_digits(123456), "123,456");
        assert_eq!(millis(&json!(0.5234)), "0.52 ms");
        assert_eq!(millis(&json!(45.21)), "45.2 ms");
        assert_eq!(millis(&json!(452.1)), "452 ms");
        assert_eq!(millis(&json!(1250.0)), "1.25 s");
        assert_eq!(millis(&Value::Null), "—");
        assert_eq!(seconds(7.9), "7s");
        assert_eq!(seconds(65.0), "1m05s");
        assert_eq!(seconds(7380.0), "2h03m");
        assert_eq!(points(&json!(0.005), true), "+0.50");
        assert_eq!(points(&json!(-0.0125), true), "-1.25");
        assert_eq!(utc_time(1_700_000_000_000, false), "22:13:20");
        assert_eq!(utc_time(1_700_000_000_000, true), "11-14 22:13:20");
        assert_eq!(wrap("a bb ccc", 4), ["a bb", "ccc"]);
    }
}
