//! Replays every input under `fuzz/corpus/` and `fuzz/artifacts/` through the same checks the
//! cargo-fuzz targets run (`fuzz/checks.rs`), so the seeds and every crash the fuzzer ever found
//! are regression tests of the normal `cargo test`, without nightly or libFuzzer.
//!
//! To keep a crash: copy the file cargo-fuzz wrote to `fuzz/artifacts/<target>/` into the
//! repository (or leave it there) and fix the code until this test passes.

use std::path::{Path, PathBuf};

include!("../../../fuzz/checks.rs");

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Every regular file under `fuzz/<sub>/<target>/`, recursively, sorted; empty if the directory
/// does not exist.
fn inputs(sub: &str, target: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries {
            let path = entry.expect("readable directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&fuzz_dir().join(sub).join(target), &mut out);
    out.sort();
    out
}

/// Runs `check` on every corpus and artifact file of `target` and reports all failing files at
/// once, by path.
fn replay(target: &str, check: fn(&[u8])) {
    let corpus = inputs("corpus", target);
    assert!(corpus.len() >= 5, "fuzz/corpus/{target}/ should hold the seed corpus, found {}", corpus.len());
    let all: Vec<PathBuf> = corpus.into_iter().chain(inputs("artifacts", target)).collect();
    let failed: Vec<String> = all
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs fail their checks:\n{}",
        failed.len(),
        all.len(),
        failed.join("\n")
    );
}

#[test]
fn decode_corpus_and_crash_inputs_pass_the_fuzz_checks() {
    replay("decode", check_decode);
}

#[test]
fn name_corpus_and_crash_inputs_pass_the_fuzz_checks() {
    replay("name", check_name);
}

#[test]
fn server_stream_corpus_and_crash_inputs_pass_the_fuzz_checks() {
    replay("server_stream", check_server_stream);
}

#[test]
fn ring_corpus_and_crash_inputs_pass_the_fuzz_checks() {
    replay("ring", check_ring);
}

#[test]
fn ring_seeds_reach_frames_decode_errors_and_corrupt_indices() {
    // A seed set that no longer reaches one of these would make fuzzing runs weaker unseen.
    let runs: Vec<_> = inputs("corpus", "ring")
        .iter()
        .map(|p| microcs::__fuzz::run_script(&std::fs::read(p).unwrap()))
        .collect();
    let Some(runs) = runs.into_iter().collect::<Result<Vec<_>, _>>().ok() else {
        return; // no memfd here
    };
    assert!(runs.iter().any(|r| r.frames > 0 && r.error.is_none()), "a seed decodes frames: {runs:?}");
    assert!(runs.iter().any(|r| r.corrupt), "a seed forges an index out of range");
    assert!(runs.iter().any(|r| r.error.is_some() && !r.corrupt), "a seed is rejected by the codec");
    assert!(
        runs.iter().any(|r| r.frames > 0 && r.bytes_written > u64::from(microcs::__fuzz::CAPACITY)),
        "a seed wraps the ring"
    );
}

#[test]
fn decode_seeds_cover_every_frame_kind_and_every_decode_error() {
    // The seeds are where the fuzzer starts from; a seed set that lost a whole class of input
    // would make fuzzing runs weaker without anyone noticing.
    use microcs::proto::{self, DecodeError, Decoded};
    let mut kinds = std::collections::BTreeSet::new();
    let mut errors = std::collections::BTreeSet::new();
    let mut incomplete = false;
    for path in inputs("corpus", "decode") {
        let data = std::fs::read(&path).unwrap();
        let Some((limit, stream)) = data.split_first_chunk::<4>() else { continue };
        match proto::decode(stream, u32::from_be_bytes(*limit)) {
            Ok(Decoded::Frame(f)) => {
                kinds.insert(f.header.kind);
            }
            Ok(Decoded::Incomplete { .. }) => incomplete = true,
            Err(e) => {
                errors.insert(match e {
                    DecodeError::TooLarge { .. } => "too large",
                    DecodeError::TooShort { .. } => "too short",
                    DecodeError::UnsupportedVersion { .. } => "version",
                    DecodeError::BadMethodLength { .. } => "method length",
                });
            }
        }
    }
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), (1..=8).collect::<Vec<u8>>());
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(incomplete);
}
