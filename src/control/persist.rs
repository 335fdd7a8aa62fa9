//! Writes weight changes back into the config file, so a restart keeps them.
//!
//! Only the `weight` values of the named `[[backend]]` tables change: comments, key order and
//! layout stay as the operator wrote them (toml_edit). The new text goes to a temporary file in
//! the same directory, which is synced and then renamed over the original, so a crash leaves
//! either the old file or the new one, never half of each. A config path that is a symlink is
//! resolved when writing, so the link stays and its target gets the change.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Value};

/// Why a weight change could not be written back (it still applies in memory). The message
/// names the file and the step; the cause is the `source`, printed after it by whoever shows
/// the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is no longer valid TOML")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml_edit::TomlError,
    },
    #[error("{path} has no [[backend]] named {name:?} (edited since it was loaded?)")]
    MissingBackend { path: PathBuf, name: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sets `weight` of each named backend in the file at `path`, atomically. When `path` is a
/// symlink (or lies under one), the file it resolves to now is the one replaced, with the
/// temporary file beside it: renaming over the link itself would turn it into a plain file
/// and leave the target with the old weights.
pub fn write_weights(path: &Path, weights: &[(&str, u32)]) -> Result<(), PersistError> {
    let read_error = |source| PersistError::Read {
        path: path.to_owned(),
        source,
    };
    let target = fs::canonicalize(path).map_err(read_error)?;
    let text = fs::read_to_string(&target).map_err(read_error)?;
    let updated = set_weights(&text, weights).map_err(|e| match e {
        EditError::Parse(source) => PersistError::Parse {
            path: path.to_owned(),
            source,
        },
        EditError::MissingBackend(name) => PersistError::MissingBackend {
            path: path.to_owned(),
            name,
        },
    })?;
    replace_file(&target, updated.as_bytes()).map_err(|source| PersistError::Write {
        path: path.to_owned(),
        source,
    })
}

enum EditError {
    Parse(toml_edit::TomlError),
    MissingBackend(String),
}

/// The config text with the weights changed and everything else kept.
fn set_weights(text: &str, weights: &[(&str, u32)]) -> Result<String, EditError> {
    let mut document: DocumentMut = text.parse().map_err(EditError::Parse)?;
    for &(name, weight) in weights {
        let table = document
            .get_mut("backend")
            .and_then(Item::as_array_of_tables_mut)
            .and_then(|backends| {
                backends
                    .iter_mut()
                    .find(|t| t.get("name").and_then(Item::as_str) == Some(name))
            })
            .ok_or_else(|| EditError::MissingBackend(name.to_string()))?;
        let mut value = Value::from(i64::from(weight));
        match table.get_mut("weight").and_then(Item::as_value_mut) {
            Some(old) => {
                *value.decor_mut() = old.decor().clone();
                *old = value;
            }
            None => {
                table.insert("weight", Item::Value(value));
            }
        }
    }
    Ok(document.to_string())
}

/// Replaces `path` with `bytes` through a synced temporary file and a rename, keeping the
/// original file's permissions.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        if let Ok(meta) = fs::metadata(path) {
            file.set_permissions(meta.permissions())?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        // Make the rename itself durable.
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# top comment
[proxy]
listen = "127.0.0.1:8080"

[[backend]]
name = "v1"   # stable
urls = ["http://127.0.0.1:8081"]
weight = 90   # most traffic

[[backend]]
name = "v2"
urls = ["http://127.0.0.1:8082"]
weight = 10
"#;

    #[test]
    fn only_weights_change_and_comments_stay() {
        let out = set_weights(TEXT, &[("v1", 80), ("v2", 20)]).ok().unwrap();
        assert_eq!(
            out,
            TEXT.replace("weight = 90   #", "weight = 80   #")
                .replace("weight = 10\n", "weight = 20\n")
        );
    }

    #[test]
    fn unknown_backend_is_an_error() {
        assert!(matches!(
            set_weights(TEXT, &[("v3", 1)]),
            Err(EditError::MissingBackend(n)) if n == "v3"
        ));
    }

    #[test]
    fn writes_atomically_and_reports_unwritable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("canary.toml");
        fs::write(&path, TEXT).unwrap();
        write_weights(&path, &[("v2", 35)]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("weight = 35") && text.contains("# most traffic"));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Through a symlink: the link stays, the target changes.
        #[cfg(unix)]
        {
            let link = dir.path().join("link.toml");
            std::os::unix::fs::symlink(&path, &link).unwrap();
            write_weights(&link, &[("v2", 36)]).unwrap();
            assert!(
                fs::symlink_metadata(&link)
                    .unwrap()
                    .file_type()
                    .is_symlink()
            );
            assert!(fs::read_to_string(&path).unwrap().contains("weight = 36"));
            fs::remove_file(&link).unwrap();
        }
        let missing = dir.path().join("nope/canary.toml");
        assert!(matches!(
            write_weights(&missing, &[("v2", 1)]),
            Err(PersistError::Read { .. })
        ));
    }
}
