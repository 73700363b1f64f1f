//! The Python venv `hack/setup.sh` installs the pinned SDKs into (the Smallest SDK and the
//! CloudEvents SDK), used by the conformance tests.

/// The venv's python (`WEBHOOK_OPERATOR_SDK_PYTHON` overrides).
pub fn sdk_python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("WEBHOOK_OPERATOR_SDK_PYTHON") {
        return p.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache")
        });
    cache.join("webhook-operator/sdk-venv/bin/python")
}

/// The venv's python, asserted present; `installs` says what `hack/setup.sh` puts there for
/// the caller (" (it installs ...)"), or is empty.
pub fn sdk_python_present(installs: &str) -> std::path::PathBuf {
    let python = sdk_python();
    assert!(
        python.exists(),
        "{} is missing: run hack/setup.sh{installs}",
        python.display()
    );
    python
}

/// The path of `tests/conformance/<name>`.
pub fn conformance_script(name: &str) -> String {
    format!("{}/tests/conformance/{name}", env!("CARGO_MANIFEST_DIR"))
}
