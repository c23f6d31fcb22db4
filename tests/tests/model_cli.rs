//! `vmm model` prints seed 001's prediction as JSON with stable field names.

use tests::vmm;

#[test]
fn model_json_has_the_documented_fields() {
    let out = vmm(&[
        "model",
        "--mode",
        "hybrid",
        "--size-mb",
        "11264",
        "--read-rate",
        "3",
        "--write-rate",
        "3",
        "--bandwidth",
        "12.5",
        "--threshold",
        "1000",
        "--phi",
        "0.3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n"], 2);
    assert!((v["tm_s"].as_f64().unwrap() - 1627.38).abs() < 0.01, "{v}");
    assert!((v["td_s"].as_f64().unwrap() - 311.06).abs() < 0.01, "{v}");
    assert_eq!(v["v1_mb"], 5632.0);
    assert_eq!(v["v3_mb"], 5632.0);
}

#[test]
fn model_refuses_bad_parameters() {
    let out = vmm(&[
        "model",
        "--mode",
        "pre",
        "--size-mb",
        "100",
        "--read-rate",
        "1",
        "--write-rate",
        "1",
        "--bandwidth",
        "0",
        "--threshold",
        "10",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("link rate"));
    let out = vmm(&["model", "--mode", "sideways", "--size-mb", "1"]);
    assert!(!out.status.success());
}
