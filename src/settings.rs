//! One dialect for `KEY=VALUE` overrides of any settings struct: `--set` on every command and
//! the simulator's `sim://?key=value`. Driven by serde, so every field a TOML file can set can
//! be set this way, with the same names and the same checks (unknown keys are refused).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The value of an override, read as TOML (`4`, `false`, `[1, 2]`, `"text"`); a bare
/// comma-separated list (`64,64,36`) as an array; anything else as a string.
pub fn parse_value(raw: &str) -> toml::Value {
    let read = |text: String| {
        toml::from_str::<toml::Table>(&format!("v = {text}")).ok().and_then(|mut t| t.remove("v"))
    };
    read(raw.to_string())
        .or_else(|| raw.contains(',').then(|| read(format!("[{raw}]"))).flatten())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Sets the field at dotted `path` (`rank`, `calibrate.rank`) of `target` to `raw`; on error
/// `target` is unchanged and the message names the key.
pub fn set<T: Serialize + DeserializeOwned>(target: &mut T, path: &str, raw: &str) -> Result<(), String> {
    let mut root = toml::Value::try_from(&*target).map_err(|e| format!("{path}: {e}"))?;
    let mut node = &mut root;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("{path:?}: write KEY=VALUE (SECTION.KEY=VALUE for a section's key)"));
    }
    for (i, key) in keys.iter().enumerate() {
        let parent = i.checked_sub(1).map_or("the settings", |j| keys[j]);
        let table = node.as_table_mut().ok_or_else(|| format!("{path}: {parent} is not a section"))?;
        if i + 1 == keys.len() {
            table.insert((*key).to_string(), parse_value(raw));
            break;
        }
        node = table.entry((*key).to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    *target =
        root.try_into().map_err(|e: toml::de::Error| format!("{path}={raw}: {}", e.message().trim()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        rank: usize,
        shape: Option<[usize; 3]>,
        name: String,
        weights: BTreeMap<String, f64>,
    }

    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        on: bool,
        inner: Inner,
    }

    #[test]
    fn values_are_read_as_toml_lists_or_text() {
        let mut o = Outer::default();
        set(&mut o, "on", "true").unwrap();
        set(&mut o, "inner.rank", "4").unwrap();
        set(&mut o, "inner.shape", "64,64,36").unwrap();
        set(&mut o, "inner.name", "run-1").unwrap();
        set(&mut o, "inner.weights.image", "0.5").unwrap();
        assert_eq!(
            o,
            Outer {
                on: true,
                inner: Inner {
                    rank: 4,
                    shape: Some([64, 64, 36]),
                    name: "run-1".into(),
                    weights: BTreeMap::from([("image".into(), 0.5)]),
                },
            }
        );
        set(&mut o, "inner.shape", "[8, 8, 2]").unwrap();
        assert_eq!(o.inner.shape, Some([8, 8, 2]));
    }

    #[test]
    fn bad_keys_and_values_are_refused_by_name_and_change_nothing() {
        let mut o = Outer::default();
        let before = o.clone();
        for (path, raw, says) in [
            ("inner.colour", "red", "colour"),
            ("inner.rank", "lots", "inner.rank=lots"),
            ("inner.shape", "1,2", "inner.shape=1,2"),
            ("on.off", "1", "on is not a section"),
            ("inner.", "1", "KEY=VALUE"),
        ] {
            let e = set(&mut o, path, raw).unwrap_err();
            assert!(e.contains(says), "{path}={raw}: {e}");
            assert_eq!(o, before);
        }
        // A value with no keys at all is refused, not indexed.
        let mut n = 5u64;
        assert!(set(&mut n, "rank", "4").unwrap_err().contains("the settings is not a section"));
        assert_eq!(n, 5);
    }
}
