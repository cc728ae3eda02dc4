//! The chart's README (`charts/anthill/README.md`), generated from `values.yaml`: each value
//! documented by a `# --` comment (continued by the `#` lines after it) above its key becomes a
//! row with its default. Every value must be documented, or sit under a documented one; the
//! generator names any that is not. A test fails when the committed README differs.

use serde_yaml::Value;

/// A documented value: its dotted path, its default as JSON, its description.
#[derive(Debug, PartialEq, Eq)]
pub struct Row {
    pub path: String,
    pub default: String,
    pub doc: String,
}

/// The documented values of `values_yaml`, in file order.
pub fn rows(values_yaml: &str) -> Result<Vec<Row>, String> {
    let tree: Value = serde_yaml::from_str(values_yaml).map_err(|e| format!("values.yaml: {e}"))?;
    let mut rows = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut doc: Option<String> = None;
    for (number, line) in values_yaml.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(text) = trimmed.strip_prefix("# --") {
            doc = Some(text.trim().to_string());
            continue;
        }
        if let Some(text) = trimmed.strip_prefix('#') {
            if let Some(doc) = doc.as_mut() {
                doc.push(' ');
                doc.push_str(text.trim());
            }
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('-') {
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else { return Err(format!("values.yaml:{}: not a key: {line:?}", number + 1)) };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.trim().to_string()));
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        let value = path.iter().try_fold(&tree, |v, k| v.get(*k)).ok_or(format!("values.yaml:{}: {key} not found", number + 1))?;
        let documented_above = rows.iter().any(|r: &Row| path.join(".").starts_with(&format!("{}.", r.path)));
        match doc.take() {
            Some(doc) => rows.push(Row { path: path.join("."), default: json(value), doc }),
            None if documented_above || value.is_mapping() && !value.as_mapping().is_some_and(|m| m.is_empty()) => {}
            None => return Err(format!("values.yaml:{}: {} has no `# --` comment", number + 1, path.join("."))),
        }
    }
    Ok(rows)
}

fn json(value: &Value) -> String {
    serde_json::to_string(value).expect("YAML values are JSON")
}

/// The README: the chart's description, how to install it, and the values' table.
pub fn readme(chart_yaml: &str, values_yaml: &str) -> Result<String, String> {
    let chart: Value = serde_yaml::from_str(chart_yaml).map_err(|e| format!("Chart.yaml: {e}"))?;
    let field = |k: &str| chart.get(k).and_then(Value::as_str).unwrap_or_default().trim().to_string();
    let mut text = format!(
        "<!-- Generated from values.yaml by `cargo run -q -p anthill-operator -- chart-readme > charts/anthill/README.md`; do not edit. -->\n\
         # {name}\n\n{description}\n\nChart {version}, Anthill {app}, Kubernetes {kube}.\n\n\
         ## Install\n\n```sh\nhelm install anthill charts/anthill\nkubectl wait anthillcluster/anthill --for=condition=Available --timeout=300s\nhelm test anthill\n```\n\n\
         Day-2 operations, the `AnthillCluster` resource and troubleshooting: docs/kubernetes.md.\n\n\
         ## Values\n\n| Key | Default | Description |\n|---|---|---|\n",
        name = field("name"),
        description = field("description"),
        version = field("version"),
        app = field("appVersion"),
        kube = field("kubeVersion"),
    );
    for row in rows(values_yaml)? {
        text.push_str(&format!("| `{}` | `{}` | {} |\n", row.path, row.default.replace('|', "\\|"), row.doc.replace('|', "\\|")));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_values_become_rows_with_their_defaults_and_an_undocumented_one_is_named() {
        let values = "# header\n\na:\n  # -- The first,\n  # over two lines.\n  b: 1\n  # -- A map.\n  c:\n    d: x\n  e:\n    # -- Deep.\n    f: []\n";
        let got = rows(values).unwrap();
        assert_eq!(
            got,
            [
                Row { path: "a.b".into(), default: "1".into(), doc: "The first, over two lines.".into() },
                Row { path: "a.c".into(), default: r#"{"d":"x"}"#.into(), doc: "A map.".into() },
                Row { path: "a.e.f".into(), default: "[]".into(), doc: "Deep.".into() },
            ]
        );
        assert_eq!(rows("a:\n  b: 1\n").unwrap_err(), "values.yaml:2: a.b has no `# --` comment");
    }

    #[test]
    fn the_committed_chart_readme_is_the_one_values_yaml_generates() {
        let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/anthill");
        let read = |f: &str| std::fs::read_to_string(chart.join(f)).unwrap();
        let generated = readme(&read("Chart.yaml"), &read("values.yaml")).unwrap();
        assert!(
            read("README.md") == generated,
            "charts/anthill/README.md differs from what values.yaml generates; write it again with\n  \
             cargo run -q -p anthill-operator -- chart-readme > charts/anthill/README.md"
        );
    }
}
