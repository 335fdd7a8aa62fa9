//! [`Chain`]: an error and each of its causes on one line, for logs and the admin API's JSON.

/// Shows an error and each of its causes, `error: cause: cause`, as anyhow's `{:#}` does: for
/// the admin API's JSON and for logs, where nothing else walks the `source` chain. Messages
/// never embed their own source, so each cause appears once.
pub(crate) struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
