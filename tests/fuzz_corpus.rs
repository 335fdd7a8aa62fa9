//! Replays the fuzz corpora on stable: every file in `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the same decoding and the same invariant checks
//! as the fuzz target (`tests/fuzz_support/mod.rs`, shared with `fuzz/fuzz_targets/`).
//! A missing or empty corpus fails: the replay cannot pass by finding nothing.

mod fuzz_support;

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

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files(&fuzz.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty"
    );
    let regressions = files(&fuzz.join("regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = fs::read(path).expect("a corpus file");
        if panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} inputs break an invariant: {failed:#?}",
        failed.len(),
        corpus.len() + regressions.len()
    );
}

#[test]
fn request_head_body_corpus() {
    replay("request_head_body", fuzz_support::check_request);
}

#[test]
fn response_head_body_corpus() {
    replay("response_head_body", fuzz_support::check_response);
}

#[test]
fn chunked_corpus() {
    replay("chunked", fuzz_support::check_chunked);
}
