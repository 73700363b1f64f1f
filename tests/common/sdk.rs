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
