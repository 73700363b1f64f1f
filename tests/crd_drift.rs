//! The committed CRDs (`crds/` and the chart's) are exactly what the Rust types generate.
//! Regenerate with `hack/gen-crds.sh`.

#[test]
fn committed_crds_match_the_rust_types() {
    let generated = webhook_operator::api::crds_yaml();
    for path in [
        "crds/webhook-operator.yaml",
        "charts/webhook-operator/crds/webhook-operator.yaml",
    ] {
        let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let committed = std::fs::read_to_string(&full)
            .unwrap_or_else(|e| panic!("{path}: {e}; run hack/gen-crds.sh"));
        assert!(
            committed == generated,
            "{path} differs from the generated CRDs; run hack/gen-crds.sh and commit the result"
        );
    }
}
