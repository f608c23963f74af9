//! What every crate's tests need from the repository (a dev-dependency only): where the
//! repository is, the Python interpreter `scripts/setup` made (pyzmq, openai,
//! prometheus_client, transformers), and the shared test vectors.

use std::path::PathBuf;

/// The repository's root (this crate is `crates/test-support`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The interpreter of the interop tests: `KVSYNC_PYTHON`, else the repository's `.venv`,
/// which must exist (a test that needs Python fails with the fix rather than running some
/// other interpreter without the packages).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KVSYNC_PYTHON") {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/setup",
        venv.display()
    );
    venv
}

/// The shared design directory with the test vectors (captures of vLLM's publisher):
/// `KVSYNC_SHARED_DIR`, else `../shared` beside the repository.
pub fn shared() -> PathBuf {
    std::env::var_os("KVSYNC_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"))
}

/// The captures of vLLM's real publisher (`testdata/vllm-kv-events` of [`shared`]).
pub fn vllm_captures() -> PathBuf {
    shared().join("testdata/vllm-kv-events")
}
