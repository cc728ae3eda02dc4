//! The `AnthillCluster` reference (`docs/crd-reference.md`), generated from the CRD's schema:
//! every field of the spec and the status with its type, default, limits, description and the
//! CEL rules the API server applies. A test fails when the committed file differs.

use kube::CustomResourceExt;
use serde_json::Value;

use crate::crd::AnthillCluster;

/// Fields whose inner structure is Kubernetes' own (documented there), or a list of entries.
const OPAQUE: &[&str] = &[
    "spec.resources",
    "spec.config",
    "spec.placement.tolerations",
    "spec.placement.topologySpreadConstraints",
    "spec.placement.nodeSelector",
    "spec.coordination.consul.tokenSecretRef",
    "status.conditions",
];

/// One line of a table: the field, its type, what the schema says of it.
fn row(path: &str, schema: &Value) -> String {
    let kind = match schema.get("type").and_then(Value::as_str) {
        Some("array") => format!("list of {}", schema["items"]["type"].as_str().unwrap_or("object")),
        Some(kind) => kind.to_string(),
        None => "any".into(),
    };
    let mut limits = Vec::new();
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        limits.push(format!(
            "one of {}",
            values.iter().map(|v| format!("`{}`", v.as_str().unwrap_or_default())).collect::<Vec<_>>().join(", ")
        ));
    }
    for (key, word) in [("minimum", "at least"), ("maximum", "at most"), ("maxLength", "at most, in characters,")] {
        if let Some(n) = schema.get(key).and_then(Value::as_f64) {
            // Whole numbers as such (the schema writes `1.0`).
            let n = if n.fract() == 0.0 { format!("{}", n as i64) } else { n.to_string() };
            limits.push(format!("{word} {n}"));
        }
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        limits.push(format!("matches `{pattern}`"));
    }
    for rule in schema.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
        limits.push(rule["message"].as_str().unwrap_or_default().to_string());
    }
    let default = schema.get("default").map_or(String::new(), |d| format!("`{d}`"));
    let description =
        schema.get("description").and_then(Value::as_str).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
    let cell = |s: &str| s.replace('|', "\\|");
    format!("| `{path}` | {kind} | {} | {} | {} |\n", cell(&default), cell(&description), cell(&limits.join("; ")))
}

/// The rows of `schema`'s properties under `path`, depth first.
fn walk(path: &str, schema: &Value, out: &mut String) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else { return };
    for (name, field) in properties {
        let path = format!("{path}.{name}");
        out.push_str(&row(&path, field));
        if !OPAQUE.contains(&path.as_str()) {
            walk(&path, field, out);
        }
    }
}

/// The reference, as committed in `docs/crd-reference.md`.
pub fn reference() -> String {
    let crd = serde_json::to_value(AnthillCluster::crd()).expect("the CRD serializes");
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"];
    let mut text = format!(
        "<!-- Generated from operator/src/crd.rs by `cargo run -q -p anthill-operator -- crd-reference > docs/crd-reference.md`; do not edit. -->\n\
         # `AnthillCluster` reference ({}/{})\n\n{}\n\n\
         Day-2 operations, conditions and troubleshooting: docs/kubernetes.md.\n\n\
         ## Rules on the whole resource\n\nChecked by the API server at `kubectl apply` (CEL):\n\n",
        crd["spec"]["group"].as_str().unwrap_or_default(),
        version["name"].as_str().unwrap_or_default(),
        schema["description"].as_str().unwrap_or_default(),
    );
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        text.push_str(&format!("- {}\n", rule["message"].as_str().unwrap_or_default()));
    }
    for part in ["spec", "status"] {
        let what = if part == "spec" { "what you ask for" } else { "what the operator reports" };
        text.push_str(&format!(
            "\n## `{part}`: {what}\n\n| Field | Type | Default | Description | Limits and rules |\n|---|---|---|---|---|\n"
        ));
        walk(part, &schema["properties"][part], &mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_reference_is_the_one_the_crd_generates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/crd-reference.md");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == reference(),
            "docs/crd-reference.md differs from what operator/src/crd.rs generates; write it again with\n  \
             cargo run -q -p anthill-operator -- crd-reference > docs/crd-reference.md"
        );
    }

    #[test]
    fn the_reference_names_every_field_its_limits_and_the_rules() {
        let text = reference();
        for needle in [
            "| `spec.replicas` | integer |",
            "| `spec.storage.size` | string |",
            "storage.size can only grow",
            "| `spec.coordination.consul.deleteKeysOnRemoval` | boolean | `false` |",
            "| `status.decommissioned` | list of string |",
            "spec.replicas must be at least spec.replicationFactor",
        ] {
            assert!(text.contains(needle), "{needle} is missing:\n{text}");
        }
        assert!(!text.contains("| `spec.resources.limits`"), "Kubernetes' own types are not unfolded");
    }
}
