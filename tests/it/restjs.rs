//! ArcGIS REST JS (pinned in tests/node/package.json, lockfile committed)
//! queries a feature layer through the demo proxy's mounted path, as an app
//! does: no token, no authentication of its own.

use std::path::Path;
use std::process::Command;

use crate::support::*;

#[test]
fn rest_js_queries_a_feature_layer_through_a_mounted_path() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    let has_node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_node
        || !dir
            .join("node_modules/@esri/arcgis-rest-feature-service")
            .exists()
    {
        // .ci/run installs the packages (npm ci) when Node is present.
        eprintln!("SKIPPED: needs node and `npm ci` in tests/node");
        return;
    }
    let mut demo = Proc::demo(&[]);
    let proxy = demo.demo_url("cleartext listener used by the page");
    let out = Command::new("node")
        .arg(dir.join("query.mjs"))
        .arg(&proxy)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let names: Vec<&str> = result["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["attributes"]["NAME"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.contains(&"Griffith Park"));
    assert!(
        !stdout.contains("demo-token-") && !stdout.contains("token="),
        "{stdout}"
    );
    let (code, _) = demo.terminate();
    assert_eq!(code, 0);
}
