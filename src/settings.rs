//! One dialect for `KEY=VALUE` overrides of any settings struct: `--set` on every command and
//! the simulator's `sim://?key=value`. Driven by serde, so every field a TOML file can set can
//! be set this way, with the same names and the same checks (unknown keys are refused).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A settings section that names input files (models, masks, events, certificates): it makes
/// its own relative ones relative to the configuration file's folder, so a configuration runs
/// from any folder and no one else lists its fields.
pub trait InputFiles {
    /// Makes this section's relative input paths relative to `base`.
    fn resolve_inputs(&mut self, base: &Path);
}

/// Values that name no file and stay as written.
const SENTINELS: [&str; 4] = ["sim", "auto", "none", "zscore-run"];

/// `p` relative to `base`, unless it is empty, absolute or a sentinel (`sim`, `none`, …).
fn rebased(p: &Path, base: &Path) -> Option<PathBuf> {
    let keep = p.as_os_str().is_empty() || p.is_absolute() || SENTINELS.iter().any(|s| p == Path::new(s));
    (!keep).then(|| base.join(p))
}

/// Makes an input path relative to `base` (see [`InputFiles`]).
pub fn rebase(p: &mut PathBuf, base: &Path) {
    if let Some(j) = rebased(p, base) {
        *p = j;
    }
}

/// Makes a setting that may name a file (or a sentinel such as `sim`) relative to `base`.
pub fn rebase_text(s: &mut String, base: &Path) {
    if let Some(j) = rebased(Path::new(s.as_str()), base) {
        *s = j.to_string_lossy().into_owned();
    }
}

/// An optional string written `"none"` when absent, so that turning off something that is on
/// by default survives TOML (which has no null).
pub mod none_string {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `None` as `"none"`.
    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or("none"))
    }

    /// Reads `"none"` as `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let s = String::deserialize(d)?;
        Ok((s != "none").then_some(s))
    }
}

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

    #[test]
    fn inputs_are_rebased_unless_absolute_empty_or_a_sentinel() {
        let base = Path::new("/cfg");
        let mut p = PathBuf::from("model");
        rebase(&mut p, base);
        assert_eq!(p, Path::new("/cfg/model"));
        for keep in ["/abs/model", "", "sim", "none", "auto", "zscore-run"] {
            let (mut p, mut t) = (PathBuf::from(keep), keep.to_string());
            rebase(&mut p, base);
            rebase_text(&mut t, base);
            assert_eq!((p.as_path(), t.as_str()), (Path::new(keep), keep));
        }
        let mut t = String::from("masks/v1.nii.gz");
        rebase_text(&mut t, base);
        assert_eq!(t, "/cfg/masks/v1.nii.gz");
    }
}
