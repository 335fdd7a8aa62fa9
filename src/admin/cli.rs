//! What `canary-proxy rollout [status [--watch] | start | pause | resume | promote | abort]`
//! does against a running proxy, through the [`AdminClient`]: a command prints the resulting
//! state in one line; `status` prints the rollout's [`view`](crate::rollout::view); `--watch`
//! redraws it every second until the rollout is over. The demo draws the same watch.
//! `canary-proxy mirror status` prints the mirroring report as a table.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::client::{AdminClient, AdminClientError};
use crate::rollout::Command;
use crate::rollout::view;

/// How often `--watch` reads the rollout.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Writes `text` to stdout; a reader that went away (`| head`) is no error: the rest is not
/// wanted.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// How a rollout subcommand ended, when the admin API answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (exit 0).
    Done,
    /// The proxy refused the command as making no sense in the rollout's state (409): the
    /// error and the state are printed (exit 1).
    Refused,
}

/// Where the view goes: stdout, and what it is.
#[derive(Debug, Clone, Copy)]
pub struct Terminal {
    /// Stdout is a terminal: the watch redraws in place.
    pub interactive: bool,
    /// ANSI colours (a terminal, and neither `NO_COLOR` nor `TERM=dumb`).
    pub color: bool,
    /// Columns to lay the view out in: `COLUMNS` when set, else 80.
    pub width: usize,
}

impl Terminal {
    pub fn stdout() -> Terminal {
        let interactive = std::io::stdout().is_terminal();
        let color = interactive
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .filter(|&c: &usize| c > 0)
            .unwrap_or(80);
        Terminal {
            interactive,
            color,
            width,
        }
    }
}

/// Runs `canary-proxy rollout COMMAND` (`None`: status): prints the new state in one line,
/// or, for status, the view (redrawn until the rollout is over or `stop` when `watch`).
pub async fn rollout(
    client: &AdminClient,
    command: Option<Command>,
    watch: bool,
    terminal: Terminal,
    stop: impl Future<Output = ()>,
) -> Result<Outcome, AdminClientError> {
    let Some(command) = command else {
        if watch {
            watch_rollout(client, terminal, "", stop).await?;
        } else {
            let status = client.get("/admin/rollout").await?;
            emit(&view::render(&status, terminal.width, terminal.color));
        }
        return Ok(Outcome::Done);
    };
    match client
        .post(&format!("/admin/rollout/{}", command.as_str()))
        .await
    {
        Ok(status) => {
            emit(&format!("{}\n", view::summary(&status)));
            Ok(Outcome::Done)
        }
        Err(AdminClientError::Status {
            status,
            error,
            body,
            ..
        }) if status == http::StatusCode::CONFLICT => {
            eprintln!("canary-proxy: {error}");
            // The whole state line when the proxy answers; the 409's own state otherwise.
            let now = client.get("/admin/rollout").await.unwrap_or(body);
            emit(&format!("{}\n", view::summary(&now)));
            Ok(Outcome::Refused)
        }
        Err(error) => Err(error),
    }
}

/// Prints the mirroring report (`GET /admin/mirror`) as a table.
pub async fn mirror_status(
    client: &AdminClient,
    terminal: Terminal,
) -> Result<(), AdminClientError> {
    let report = client.get("/admin/mirror").await?;
    emit(&crate::mirror::view::render(&report, terminal.width));
    Ok(())
}

/// Draws the rollout every [`WATCH_EVERY`] under `header` until it is over (the final view
/// stays) or `stop` completes; answers the last status read. On a terminal each frame
/// replaces the last; elsewhere (a pipe, a log) a frame is printed when the state, the step
/// or the history changes, and at the end. A first read that fails is an error; a later one
/// is shown and retried.
pub async fn watch_rollout(
    client: &AdminClient,
    terminal: Terminal,
    header: &str,
    stop: impl Future<Output = ()>,
) -> Result<Value, AdminClientError> {
    tokio::pin!(stop);
    let mut status = client.get("/admin/rollout").await?;
    let mut out = std::io::stdout();
    let mut trouble: Option<String> = None;
    let mut shown_key = None;
    let mut first = true;
    loop {
        let over = view::is_final(&status);
        if terminal.interactive {
            let frame = frame(&status, terminal, header, trouble.as_deref(), over);
            let _ = out.write_all(redraw(&frame, first).as_bytes());
        } else {
            let key = change_key(&status);
            if shown_key.as_ref() != Some(&key) {
                let frame = frame(&status, terminal, header, None, over);
                let _ =
                    out.write_all(format!("{}{frame}", if first { "" } else { "\n" }).as_bytes());
                shown_key = Some(key);
            }
        }
        let _ = out.flush();
        first = false;
        if over {
            return Ok(status);
        }
        tokio::select! {
            () = &mut stop => return Ok(status),
            () = tokio::time::sleep(WATCH_EVERY) => {}
        }
        match client.get("/admin/rollout").await {
            Ok(new) => {
                status = new;
                trouble = None;
            }
            Err(error) => {
                let message = crate::chain::Chain(&error).to_string();
                if !terminal.interactive && trouble.as_ref() != Some(&message) {
                    eprintln!("canary-proxy: {message} (retrying every second)");
                }
                trouble = Some(message);
            }
        }
    }
}

/// One frame: the header, the view, and what the watch is doing.
fn frame(
    status: &Value,
    terminal: Terminal,
    header: &str,
    trouble: Option<&str>,
    over: bool,
) -> String {
    let mut frame = String::from(header);
    frame.push_str(&view::render(status, terminal.width, terminal.color));
    if let Some(trouble) = trouble {
        frame.push_str(&format!("\n! {trouble}; retrying every second\n"));
    } else if terminal.interactive && !over {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        frame.push_str(&format!(
            "\nupdated {:02}:{:02}:{:02} UTC, every second; Ctrl-C stops watching\n",
            (now / 3600) % 24,
            (now / 60) % 60,
            now % 60
        ));
    }
    frame
}

/// The ANSI to draw `frame` over the last one without flicker: cursor home, each line
/// cleared to its end, the rest of the screen cleared (the whole screen the first time).
fn redraw(frame: &str, first: bool) -> String {
    let mut out = String::from(if first { "\x1b[2J\x1b[H" } else { "\x1b[H" });
    for line in frame.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

/// What makes a new frame worth printing where frames pile up instead of replacing.
fn change_key(status: &Value) -> (Value, Value, usize) {
    (
        status["state"].clone(),
        status["step"].clone(),
        status["history"].as_array().map_or(0, Vec::len),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_redraw_clears_what_the_last_frame_left() {
        assert_eq!(
            redraw("a\nb\n", true),
            "\x1b[2J\x1b[Ha\x1b[K\nb\x1b[K\n\x1b[J"
        );
        assert!(redraw("a\n", false).starts_with("\x1b[Ha"));
    }

    #[test]
    fn piped_frames_follow_transitions_not_counts() {
        let a = json!({"state": "running", "step": 0, "history": [1], "canary": {"requests": 5}});
        let mut b = a.clone();
        b["canary"]["requests"] = json!(6);
        assert_eq!(change_key(&a), change_key(&b));
        b["step"] = json!(1);
        assert_ne!(change_key(&a), change_key(&b));
    }
}
