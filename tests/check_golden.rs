//! `ztund check` as a user runs it: the binary on a mesh file holding the four documents of
//! Istio's mutual-TLS guide plus a few workloads, services and policies prints exactly the
//! checked-in report (`ZTUND_BLESS=1` rewrites it after a deliberate change); a bad document
//! exits non-zero with a message naming the file, the document and the field, and prints no
//! report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn check(files: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztund"))
        .arg("check")
        .args(files)
        .output()
        .expect("running ztund check")
}

#[test]
fn the_report_matches_the_golden_file() {
    let output = check(&[&golden("check_mesh.yaml")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ztund check failed: {stderr}");
    let report = String::from_utf8(output.stdout).expect("UTF-8 report");
    let expected_path = golden("check_mesh.txt");
    if std::env::var_os("ZTUND_BLESS").is_some() {
        std::fs::write(&expected_path, &report).expect("writing the golden file");
    }
    let expected = std::fs::read_to_string(&expected_path).expect("reading the golden file");
    assert_eq!(
        report,
        expected,
        "ztund check output differs from {} (ZTUND_BLESS=1 to accept)",
        expected_path.display()
    );
    // The guide's documents are all in force, with the one that decided each line.
    for needle in [
        "all ports: STRICT (PeerAuthentication default/default)",
        "PERMISSIVE (PeerAuthentication legacy/relaxed)",
        "PERMISSIVE (PeerAuthentication default/example-metrics)",
        "port 80: HBONE (ISTIO_MUTUAL) (DestinationRule default/example-destination)",
    ] {
        assert!(report.contains(needle), "missing {needle:?}:\n{report}");
    }
}

/// Each bad document, the field the error must name, and a word of the reason.
const BAD: [(&str, &str, &str); 4] = [
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: bad, namespace: default}\nspec: {mtls: {mode: STRICTLY}}\n",
        "spec.mtls.mode",
        "STRICTLY",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: default}\nspec: {action: AUDIT_ALL, rules: [{}]}\n",
        "spec.action",
        "AUDIT_ALL",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ap, namespace: default}\nspec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]}\n",
        "ipBlocks",
        "10.0.0.0/99",
    ),
    (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: default}\nspec: {host: x.example, trafficPolicy: {tls: {mode: MUTUAL}}}\n",
        "clientCertificate",
        "MUTUAL",
    ),
];

#[test]
fn a_bad_document_names_file_document_and_field_and_prints_no_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, (yaml, field, word)) in BAD.iter().enumerate() {
        // A good document first, so the bad one is document 2.
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: default}}\nspec: {{nodeName: n, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 10.1.0.1}}\n---\n{yaml}"
        );
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, text).expect("writing a test file");
        let output = check(&[&golden("check_mesh.yaml"), &file]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "accepted bad document {i}: {yaml}"
        );
        assert!(
            output.stdout.is_empty(),
            "printed a report for bad document {i}"
        );
        let file_name = file.display().to_string();
        for needle in [file_name.as_str(), "document 2", field, word] {
            assert!(
                stderr.contains(needle),
                "error for bad document {i} does not contain {needle:?}: {stderr}"
            );
        }
    }
}
