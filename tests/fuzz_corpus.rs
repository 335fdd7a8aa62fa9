//! Replays the fuzz corpora on stable: every file in `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the same decoding and the same invariant checks
//! as the fuzz target (`tests/fuzz_support/mod.rs`, shared with `fuzz/fuzz_targets/`).
//! A missing or empty corpus fails: the replay cannot pass by finding nothing.
//!
//! Regression inputs are checked with every prefix cut ([`Cuts::All`]). One whose name starts
//! with `open-` records a bug not fixed yet: it must still break an invariant (when it no
//! longer does, the bug is fixed: drop the prefix so that it guards the fix).

mod fuzz_support;

use fuzz_support::Cuts;

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8], Cuts)) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty"
    );
    let regressions = files(&fuzz.join("regressions").join(target));
    let inputs = corpus
        .iter()
        .map(|path| (path, Cuts::Sampled))
        .chain(regressions.iter().map(|path| (path, Cuts::All)));
    let mut failed = Vec::new();
    let mut fixed = Vec::new();
    for (path, cuts) in inputs {
        let data = fs::read(path).expect("a corpus file");
        let open = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("open-"));
        let broke = panic::catch_unwind(|| check(&data, cuts)).is_err();
        if broke && !open {
            failed.push(path.display().to_string());
        } else if open && !broke {
            fixed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs break an invariant: {failed:#?}",
        failed.len(),
        corpus.len() + regressions.len()
    );
    assert!(
        fixed.is_empty(),
        "{target}: these known-bug inputs pass now; drop their `open-` prefix: {fixed:#?}"
    );
}

#[test]
fn request_head_body_corpus() {
    replay("request_head_body", fuzz_support::check_request_cuts);
}

#[test]
fn response_head_body_corpus() {
    replay("response_head_body", fuzz_support::check_response_cuts);
}

#[test]
fn chunked_corpus() {
    replay("chunked", fuzz_support::check_chunked_cuts);
}
