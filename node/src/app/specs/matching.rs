//! Comparing what a spec expects with what happened: JSON values with wildcards and named
//! placeholders, and a readable list of differences.
//!
//! In an expected value:
//! - the string `"*"` matches anything (a generated id, a timestamp);
//! - a string `"$name"` matches anything the first time and binds `name` to it; every later
//!   `"$name"` of the same spec must then be equal (the same generated id in an event and in a
//!   query result);
//! - a string starting with `$$` stands for the literal string with one `$` less;
//! - objects must have exactly the expected fields, arrays exactly the expected elements.

use std::collections::HashMap;

use serde_json::Value as Json;

/// Values bound to placeholders so far in one spec.
pub type Bindings = HashMap<String, Json>;

/// Compares `actual` with `expected` at `path`; pushes one line per difference.
pub fn compare(expected: &Json, actual: &Json, path: &str, bindings: &mut Bindings, diffs: &mut Vec<String>) {
    match (expected, actual) {
        (Json::String(wild), _) if wild == "*" => {}
        (Json::String(literal), _) if literal.starts_with("$$") => {
            if actual.as_str() != Some(&literal[1..]) {
                diffs.push(format!("{path}: expected {:?}, got {}", &literal[1..], show(actual)));
            }
        }
        (Json::String(name), _) if name.len() > 1 && name.starts_with('$') => match bindings.get(&name[1..]) {
            None => {
                bindings.insert(name[1..].to_string(), actual.clone());
            }
            Some(bound) if bound == actual => {}
            Some(bound) => diffs.push(format!("{path}: expected {name} = {}, got {}", show(bound), show(actual))),
        },
        (Json::Object(want), Json::Object(got)) => {
            for (key, value) in want {
                match got.get(key) {
                    Some(actual) => compare(value, actual, &format!("{path}.{key}"), bindings, diffs),
                    None => diffs.push(format!("{path}.{key}: expected {}, but the field is missing", show(value))),
                }
            }
            for key in got.keys().filter(|key| !want.contains_key(*key)) {
                diffs.push(format!("{path}.{key}: not expected, got {}", show(&got[key])));
            }
        }
        (Json::Array(want), Json::Array(got)) => {
            for (i, (value, actual)) in want.iter().zip(got).enumerate() {
                compare(value, actual, &format!("{path}[{i}]"), bindings, diffs);
            }
            if want.len() != got.len() {
                diffs.push(format!("{path}: expected {} entries, got {}", want.len(), got.len()));
            }
        }
        _ if expected == actual => {}
        _ => diffs.push(format!("{path}: expected {}, got {}", show(expected), show(actual))),
    }
}

/// A value on one line.
pub fn show(value: &Json) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn diff(expected: Json, actual: Json) -> Vec<String> {
        let mut diffs = Vec::new();
        compare(&expected, &actual, "then", &mut Bindings::new(), &mut diffs);
        diffs
    }

    #[test]
    fn given_equal_values_then_no_difference() {
        assert!(diff(json!({"a": [1, "x"]}), json!({"a": [1, "x"]})).is_empty());
    }

    #[test]
    fn given_a_different_field_then_its_path_and_both_values_are_named() {
        assert_eq!(diff(json!({"a": {"b": 1}}), json!({"a": {"b": 2}})), vec!["then.a.b: expected 1, got 2"]);
    }

    #[test]
    fn given_missing_and_extra_fields_and_lengths_then_each_is_reported() {
        let d = diff(json!({"a": 1, "l": [1, 2]}), json!({"b": 1, "l": [1]}));
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.iter().any(|l| l.contains("then.a") && l.contains("missing")));
        assert!(d.iter().any(|l| l.contains("then.b: not expected")));
        assert!(d.iter().any(|l| l.contains("expected 2 entries, got 1")));
    }

    #[test]
    fn given_a_wildcard_then_anything_matches() {
        assert!(diff(json!({"at": "*"}), json!({"at": 12345})).is_empty());
    }

    #[test]
    fn given_a_placeholder_used_twice_then_both_must_be_equal() {
        assert!(diff(json!([{"id": "$t"}, {"ref": "$t"}]), json!([{"id": "x-1"}, {"ref": "x-1"}])).is_empty());
        let d = diff(json!([{"id": "$t"}, {"ref": "$t"}]), json!([{"id": "x-1"}, {"ref": "x-2"}]));
        assert_eq!(d, vec![r#"then[1].ref: expected $t = "x-1", got "x-2""#]);
    }

    #[test]
    fn given_a_doubled_dollar_then_it_is_a_literal() {
        assert!(diff(json!("$$5"), json!("$5")).is_empty());
        assert_eq!(diff(json!("$$5"), json!("5")).len(), 1);
        // Not a placeholder, whatever the actual value is.
        for other in [json!(5), json!(null), json!({"a": 1}), json!(["$5"])] {
            assert_eq!(diff(json!("$$5"), other.clone()).len(), 1, "{other}");
        }
    }
}
