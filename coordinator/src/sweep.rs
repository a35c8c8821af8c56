//! Sweep files: a base run spec and axes, expanded into the product of their values. A
//! data-scaling ablation is one axis over `dataset.train_cases`; any key of the spec can be an
//! axis, named by its TOML path (`train.lr`, `model.arch`, `seed`).
//!
//! ```toml
//! name = "demo-scaling"
//! priority = 0             # optional; every child's queue priority unless an axis sets it
//! base = "demo.toml"       # a run spec next to this file, or an inline [base] table
//! [axes]
//! "dataset.train_cases" = [4, 8, 16]
//! seed = [1, 2]
//! ```
//!
//! An axis sets exactly the key it names, so two axes may not overlap (`dataset` and
//! `dataset.train_cases`: the later would undo part of the earlier while the child's name still
//! showed both), an axis may not repeat a value (it would queue the same run twice), and an
//! axis over `priority` beats the sweep's own `priority`.
//!
//! The CLI expands a file to check it and inlines its base; the coordinator expands it again on
//! receipt (one schema on both sides) and queues every child or none.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use protocol::spec::RunSpec;
use thiserror::Error;
use toml::{Table, Value};

/// More children than this is almost certainly a typo in an axis, not an experiment.
pub const MAX_CHILDREN: usize = 10_000;

#[derive(Debug, Error)]
pub enum SweepError {
    #[error("{source_name}: {message}")]
    Invalid { source_name: String, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SweepFile {
    pub name: String,
    pub priority: Option<i32>,
    /// The base run spec, as a TOML table.
    pub base: Table,
    /// Axis keys and their values, in file order.
    pub axes: Vec<(String, Vec<Value>)>,
}

/// One run of the product: its axis values (in axis order) and its validated spec.
#[derive(Debug, Clone)]
pub struct Child {
    pub values: Vec<Value>,
    pub spec: RunSpec,
}

/// How a value reads in listings and child names: `4`, `"unet"`, `0.001`.
pub fn literal(value: &Value) -> String {
    value.to_string()
}

impl SweepFile {
    /// Parses a sweep file. `load_base` reads a `base = "path"` reference (the CLI resolves it
    /// next to the sweep file; the coordinator accepts only inlined bases).
    pub fn parse(
        text: &str,
        source_name: &str,
        load_base: impl FnOnce(&str) -> Result<String, String>,
    ) -> Result<Self, SweepError> {
        let invalid = |message: String| SweepError::Invalid {
            source_name: source_name.to_string(),
            message,
        };
        let mut table: Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let name = match table.remove("name") {
            Some(Value::String(name)) if !name.trim().is_empty() => name,
            Some(_) => return Err(invalid("field `name`: must be a non-empty string".into())),
            None => return Err(invalid("field `name`: missing (the sweep's name)".into())),
        };
        let priority = match table.remove("priority") {
            None => None,
            Some(Value::Integer(p)) => {
                Some(i32::try_from(p).map_err(|_| invalid(format!("field `priority`: {p} is out of range")))?)
            }
            Some(_) => return Err(invalid("field `priority`: must be an integer".into())),
        };
        let base = match table.remove("base") {
            Some(Value::Table(base)) => base,
            Some(Value::String(path)) => {
                let text = load_base(&path).map_err(|e| invalid(format!("field `base`: {e}")))?;
                toml::from_str(&text).map_err(|e| invalid(format!("base spec {path}: {e}")))?
            }
            Some(_) => return Err(invalid("field `base`: must be a file name or a [base] table".into())),
            None => {
                return Err(invalid(
                    "field `base`: missing (a run spec file, or a [base] table)".into(),
                ));
            }
        };
        let axes = match table.remove("axes") {
            Some(Value::Table(axes)) => axes,
            Some(_) => return Err(invalid("field `axes`: must be a table of key = [values]".into())),
            None => {
                return Err(invalid(
                    "field `axes`: missing (e.g. \"dataset.train_cases\" = [21, 100])".into(),
                ));
            }
        };
        if let Some(key) = table.keys().next() {
            return Err(invalid(format!(
                "unknown field `{key}`; a sweep has name, priority, base and axes"
            )));
        }
        let mut parsed = vec![];
        flatten_axes("", axes, &mut parsed).map_err(invalid)?;
        if parsed.is_empty() {
            return Err(invalid("field `axes`: give at least one axis".into()));
        }
        check_axes(&parsed).map_err(invalid)?;
        Ok(SweepFile {
            name,
            priority,
            base,
            axes: parsed,
        })
    }

    /// The file with its base inlined: what travels to the coordinator and is stored.
    pub fn to_toml(&self) -> String {
        let mut table = Table::new();
        table.insert("name".into(), Value::String(self.name.clone()));
        if let Some(p) = self.priority {
            table.insert("priority".into(), Value::Integer(p.into()));
        }
        table.insert("base".into(), Value::Table(self.base.clone()));
        let axes: Table = self
            .axes
            .iter()
            .map(|(k, v)| (k.clone(), Value::Array(v.clone())))
            .collect();
        table.insert("axes".into(), Value::Table(axes));
        toml::to_string(&table).expect("a TOML table always serialises")
    }

    pub fn axis_keys(&self) -> Vec<String> {
        self.axes.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Whether an axis sets each child's queue priority (so no one priority is the sweep's).
    pub fn priority_by_axis(&self) -> bool {
        self.axes.iter().any(|(k, _)| k == PRIORITY)
    }

    /// Every child, validated; the first problem rejects the whole sweep, naming the axis.
    pub fn expand(&self, source_name: &str) -> Result<Vec<Child>, SweepError> {
        let invalid = |message: String| SweepError::Invalid {
            source_name: source_name.to_string(),
            message,
        };
        let total = self
            .axes
            .iter()
            .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len()))
            .filter(|n| *n <= MAX_CHILDREN)
            .ok_or_else(|| invalid(format!("the axes expand to more than {MAX_CHILDREN} runs")))?;
        // The base alone must be a valid spec, so its errors are not blamed on an axis.
        let base_spec = RunSpec::from_toml(
            &toml::to_string(&self.base).expect("a TOML table always serialises"),
            &format!("{source_name} [base]"),
        )
        .map_err(|e| invalid(e.to_string()))?;
        let canonical: Table = toml::from_str(&base_spec.to_toml()).expect("canonical specs parse");
        // The sweep's priority replaces the base's, and an axis over `priority` replaces both:
        // set before the axes, never after them.
        let mut base = self.base.clone();
        if let Some(p) = self.priority {
            base.insert(PRIORITY.into(), Value::Integer(p.into()));
        }
        let mut children: Vec<Child> = Vec::with_capacity(total);
        // A hash of each child's canonical spec without its name, to catch two values that read
        // differently but make the same run (`{url = "/d"}` and `{url = "/d", train_cases = 0}`).
        // Hashes, not the text: a spec may hold thousands of case ids.
        let mut seen: HashMap<u64, usize> = HashMap::with_capacity(total);
        for index in 0..total {
            let mut table = base.clone();
            let mut values = Vec::with_capacity(self.axes.len());
            let mut rest = index;
            // The last axis varies fastest, like nested loops written in file order.
            let mut picks = vec![0; self.axes.len()];
            for (i, (_, axis)) in self.axes.iter().enumerate().rev() {
                picks[i] = rest % axis.len();
                rest /= axis.len();
            }
            for ((key, axis), pick) in self.axes.iter().zip(&picks) {
                let value = axis[*pick].clone();
                set_path(&mut table, key).map_err(|e| invalid(format!("axis `{key}`: {e}")))?;
                *lookup_mut(&mut table, key).expect("set_path made the path") = value.clone();
                values.push(value);
            }
            let label: Vec<String> = self
                .axes
                .iter()
                .zip(&values)
                .map(|((key, _), v)| format!("{}={}", key.rsplit('.').next().unwrap_or(key), literal(v)))
                .collect();
            table.insert(
                "name".into(),
                Value::String(format!("{} {}", self.name, label.join(" "))),
            );
            let text = toml::to_string(&table).expect("a TOML table always serialises");
            let spec = RunSpec::from_toml(&text, source_name).map_err(|e| {
                let key = self
                    .axes
                    .iter()
                    .map(|(k, _)| k)
                    .find(|k| lookup(&canonical, k).is_none() && e.to_string().contains("unknown field"));
                match key {
                    Some(key) => invalid(format!("axis `{key}` is not a key of the run spec ({e})")),
                    None => {
                        let full: Vec<String> = self
                            .axes
                            .iter()
                            .zip(&values)
                            .map(|((k, _), v)| format!("axis `{k}` = {}", literal(v)))
                            .collect();
                        invalid(format!("{} makes an invalid spec: {e}", full.join(", ")))
                    }
                }
            })?;
            let unnamed = |spec: &RunSpec| RunSpec {
                name: String::new(),
                ..spec.clone()
            };
            let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(unnamed(&spec).to_toml());
            let earlier = seen
                .insert(hash, index)
                .filter(|e| unnamed(&children[*e].spec) == unnamed(&spec));
            if let Some(earlier) = earlier {
                let describe = |child: &Child| {
                    let values: Vec<String> = self
                        .axes
                        .iter()
                        .zip(&child.values)
                        .map(|((k, _), v)| format!("{k} = {}", literal(v)))
                        .collect();
                    values.join(", ")
                };
                let this = Child { values, spec };
                return Err(invalid(format!(
                    "axis values ({}) and ({}) make the same run; drop one of them",
                    describe(&children[earlier]),
                    describe(&this)
                )));
            }
            children.push(Child { values, spec });
        }
        Ok(children)
    }
}

const PRIORITY: &str = "priority";

/// Axes as `key = [values]`; a dotted key written bare (`dataset.train_cases = [4]`) is a table
/// in TOML, so it is walked back into its path.
fn flatten_axes(prefix: &str, axes: Table, out: &mut Vec<(String, Vec<Value>)>) -> Result<(), String> {
    for (key, values) in axes {
        let key = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match values {
            Value::Array(values) if !values.is_empty() => out.push((key, values)),
            Value::Table(inner) if !inner.is_empty() => flatten_axes(&key, inner, out)?,
            _ => return Err(format!("axis `{key}`: must be a non-empty array of values")),
        }
    }
    Ok(())
}

/// Refuses axes that would not do what their names say: two over one key (or one inside the
/// other), a repeated value, and one over the name, which the sweep gives each child. Linear in
/// the file's size: the coordinator checks files sent to it.
fn check_axes(axes: &[(String, Vec<Value>)]) -> Result<(), String> {
    let mut keys: HashMap<&str, usize> = HashMap::with_capacity(axes.len());
    for (i, (key, _)) in axes.iter().enumerate() {
        if key == "name" {
            return Err(
                "axis `name`: each child is named by the sweep's `name` and its axis values; \
                 rename the sweep instead"
                    .into(),
            );
        }
        if keys.insert(key, i).is_some() {
            return Err(format!(
                "axis `{key}` is given twice (once as a quoted key, once as a dotted one); keep one"
            ));
        }
    }
    for (i, (key, values)) in axes.iter().enumerate() {
        let mut outers = key.match_indices('.').map(|(at, _)| &key[..at]);
        if let Some(outer) = outers.find(|outer| keys.contains_key(outer)) {
            // Named in file order.
            let (first, second) = if keys[outer] < i {
                (outer, key.as_str())
            } else {
                (key.as_str(), outer)
            };
            return Err(format!(
                "axes `{first}` and `{second}` overlap: `{outer}` sets the whole table that `{key}` \
                 is part of, so one would undo the other; put `{key}`'s values into `{outer}`'s \
                 or drop one axis"
            ));
        }
        // Literals, as they are hashable where floats are not; values that are equal but read
        // differently (a table's keys in another order) make the same run, caught in `expand`.
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(values.len());
        for (j, value) in values.iter().enumerate() {
            if let Some(k) = seen.insert(literal(value), j) {
                return Err(format!(
                    "axis `{key}`: value {} is given twice (values {} and {}), which would queue the same \
                     run twice; drop one",
                    literal(value),
                    k + 1,
                    j + 1
                ));
            }
        }
    }
    Ok(())
}

/// Makes sure every table on the way to `key` exists, so the leaf can be set.
fn set_path(table: &mut Table, key: &str) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("not a TOML path (empty segment)".into());
    }
    let mut here = table;
    for part in &parts[..parts.len() - 1] {
        let next = here
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        here = match next {
            Value::Table(t) => t,
            _ => return Err(format!("`{part}` is a value, not a table")),
        };
    }
    here.entry(parts[parts.len() - 1].to_string())
        .or_insert(Value::Boolean(false));
    Ok(())
}

fn lookup<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    let (head, rest) = key.split_once('.').map_or((key, None), |(h, r)| (h, Some(r)));
    match (table.get(head)?, rest) {
        (value, None) => Some(value),
        (Value::Table(t), Some(rest)) => lookup(t, rest),
        _ => None,
    }
}

/// The value at a dotted TOML path (`dataset.url`) of `table`, for editing in place.
pub fn lookup_mut<'a>(table: &'a mut Table, key: &str) -> Option<&'a mut Value> {
    let (head, rest) = key.split_once('.').map_or((key, None), |(h, r)| (h, Some(r)));
    match (table.get_mut(head)?, rest) {
        (value, None) => Some(value),
        (Value::Table(t), Some(rest)) => lookup_mut(t, rest),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
name = "scaling"
priority = 5
[base]
name = "b"
world_size = 1
[base.dataset]
url = "/data"
eval_cases = 2
[base.model]
arch = "unet"
depth = 2
[base.train]
steps = 4
patch = [8, 8, 8]
lr = 0.01
[base.artifacts]
url = "/art"
[axes]
"dataset.train_cases" = [4, 8, 16]
seed = [1, 2]
"#;

    fn no_base(_: &str) -> Result<String, String> {
        Err("no files here".into())
    }

    #[test]
    fn the_product_expands_in_file_order_with_the_last_axis_fastest() {
        let sweep = SweepFile::parse(SWEEP, "s.toml", no_base).unwrap();
        assert_eq!(sweep.axis_keys(), ["dataset.train_cases", "seed"]);
        let children = sweep.expand("s.toml").unwrap();
        let got: Vec<(u32, u64, i32)> = children
            .iter()
            .map(|c| (c.spec.dataset.train_cases, c.spec.seed, c.spec.priority))
            .collect();
        assert_eq!(
            got,
            [(4, 1, 5), (4, 2, 5), (8, 1, 5), (8, 2, 5), (16, 1, 5), (16, 2, 5)]
        );
        assert_eq!(children[3].spec.name, "scaling train_cases=8 seed=2");
        assert_eq!(children[3].values.iter().map(literal).collect::<Vec<_>>(), ["8", "2"]);
        // The inlined form round-trips.
        let again = SweepFile::parse(&sweep.to_toml(), "inlined", no_base).unwrap();
        assert_eq!(again, sweep);
    }

    /// The error expanding SWEEP with its seed axis replaced by `axis`.
    fn expand_err(axis: &str) -> String {
        let text = SWEEP.replace("seed = [1, 2]", axis);
        SweepFile::parse(&text, "s.toml", no_base)
            .and_then(|s| s.expand("s.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn an_unknown_axis_or_a_bad_value_names_the_key() {
        let err = expand_err(r#""train.lrr" = [0.1]"#);
        assert!(err.contains("axis `train.lrr` is not a key"), "{err}");
        let err = expand_err(r#""train.lr" = [0.1, -1.0]"#);
        assert!(
            err.contains("axis `train.lr` = -1.0") && err.contains("field `train.lr`"),
            "{err}"
        );
        let err = expand_err(r#""seed.x" = [1]"#);
        assert!(err.contains("axis `seed.x`"), "{err}");
        // A key the base leaves out but the spec knows is fine.
        let optional = SWEEP.replace("seed = [1, 2]", "\"train.warmup_steps\" = [0, 1]");
        let children = SweepFile::parse(&optional, "s.toml", no_base)
            .unwrap()
            .expand("s")
            .unwrap();
        assert_eq!(children[1].spec.train.warmup_steps, 1);
    }

    #[test]
    fn an_axis_over_priority_beats_the_sweeps_priority_and_the_sweeps_beats_the_bases() {
        let text = SWEEP.replace("seed = [1, 2]", "priority = [1, 100]");
        let sweep = SweepFile::parse(&text, "s.toml", no_base).unwrap();
        assert!(sweep.priority_by_axis());
        let children = sweep.expand("s.toml").unwrap();
        let got: Vec<(&str, i32)> = children[..2]
            .iter()
            .map(|c| (c.spec.name.as_str(), c.spec.priority))
            .collect();
        assert_eq!(
            got,
            [
                ("scaling train_cases=4 priority=1", 1),
                ("scaling train_cases=4 priority=100", 100)
            ]
        );
        let base_says_3 = SWEEP.replace("world_size = 1", "world_size = 1\npriority = 3");
        let sweep = SweepFile::parse(&base_says_3, "s.toml", no_base).unwrap();
        assert!(!sweep.priority_by_axis());
        assert!(sweep.expand("s").unwrap().iter().all(|c| c.spec.priority == 5));
        let no_sweep_priority = base_says_3.replace("priority = 5\n", "");
        let sweep = SweepFile::parse(&no_sweep_priority, "s.toml", no_base).unwrap();
        assert!(sweep.expand("s").unwrap().iter().all(|c| c.spec.priority == 3));
    }

    #[test]
    fn overlapping_axes_are_refused_naming_both() {
        let whole_table = SWEEP.replace(
            "seed = [1, 2]",
            "dataset = [{ url = \"/data\", eval_cases = 2, train_cases = 10 }]",
        );
        let err = SweepFile::parse(&whole_table, "s.toml", no_base)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.toml") && err.contains("axes `dataset.train_cases` and `dataset` overlap"),
            "{err}"
        );
        // Quoted and bare dotted keys name one path.
        let twice = SWEEP.replace("seed = [1, 2]", "dataset.train_cases = [2]");
        let err = SweepFile::parse(&twice, "s.toml", no_base).unwrap_err().to_string();
        assert!(err.contains("axis `dataset.train_cases` is given twice"), "{err}");
        // A bare dotted key alone is the same axis as the quoted one.
        let bare = SWEEP.replace("\"dataset.train_cases\"", "dataset.train_cases");
        let sweep = SweepFile::parse(&bare, "s.toml", no_base).unwrap();
        assert_eq!(sweep.axis_keys(), ["dataset.train_cases", "seed"]);
        assert_eq!(sweep, SweepFile::parse(SWEEP, "s.toml", no_base).unwrap());
        let disjoint = SWEEP.replace("seed = [1, 2]", "dataset.eval_cases = [1, 2]");
        let sweep = SweepFile::parse(&disjoint, "s.toml", no_base).unwrap();
        assert_eq!(sweep.expand("s").unwrap()[1].spec.dataset.eval_cases, 2);
    }

    #[test]
    fn a_repeated_value_or_two_values_making_one_run_are_refused() {
        let err = expand_err("seed = [1, 1, 1]");
        assert!(
            err.contains("axis `seed`: value 1 is given twice (values 1 and 2)"),
            "{err}"
        );
        let err = expand_err("\"train.lr\" = [0.001, 1e-3]");
        assert!(err.contains("axis `train.lr`: value 0.001 is given twice"), "{err}");
        // Different values, one run: `train_cases = 0` is the default.
        let same = SWEEP.replace("\"dataset.train_cases\" = [4, 8, 16]\n", "").replace(
            "seed = [1, 2]",
            "dataset = [{ url = \"/data\", eval_cases = 2 }, { url = \"/data\", eval_cases = 2, train_cases = 0 }]",
        );
        let err = SweepFile::parse(&same, "s.toml", no_base)
            .unwrap()
            .expand("s.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("make the same run") && err.contains("train_cases = 0"),
            "{err}"
        );
        let err = expand_err("name = [\"a\", \"b\"]");
        assert!(err.contains("axis `name`"), "{err}");
    }

    #[test]
    fn malformed_files_are_refused_by_field() {
        let cases = [
            (SWEEP.replace("name = \"scaling\"", ""), "field `name`"),
            (SWEEP.replace("priority = 5", "priority = \"high\""), "field `priority`"),
            (SWEEP.replace("seed = [1, 2]", "seed = []"), "axis `seed`"),
            (SWEEP.replace("priority = 5", "prio = 5"), "unknown field `prio`"),
            (
                format!(
                    "{SWEEP}\n\"model.depth\" = [2, 3, 4, 5, 6, 7, 8]\n\"train.steps\" = {:?}",
                    (1..2000).collect::<Vec<_>>()
                ),
                "more than",
            ),
        ];
        for (text, expect) in cases {
            let err = SweepFile::parse(&text, "s.toml", no_base)
                .and_then(|s| s.expand("s.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect) && err.contains("s.toml"), "{expect}: {err}");
        }
        let by_file = "name = 'x'\nbase = 'base.toml'\n[axes]\nseed = [1]\n";
        let err = SweepFile::parse(by_file, "s.toml", no_base).unwrap_err().to_string();
        assert!(err.contains("field `base`: no files here"), "{err}");
    }
}

#[cfg(test)]
mod shipped {
    use super::SweepFile;

    /// The sweeps in configs/ expand into the runs their comments promise.
    #[test]
    fn the_shipped_sweeps_validate() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs");
        let load = |name: &str| {
            let path = format!("{dir}/{name}");
            let text = std::fs::read_to_string(&path).unwrap();
            SweepFile::parse(&text, &path, |_| Err("inline".into()))
                .and_then(|s| s.expand(&path))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let suprem = load("suprem-scaling.toml");
        let sizes: Vec<u32> = suprem.iter().map(|c| c.spec.dataset.train_cases).collect();
        assert_eq!(sizes, [21, 100, 1000, 3000, 9262]);
        assert!(
            suprem
                .iter()
                .all(|c| c.spec.priority == 10 && c.spec.device.as_deref() == Some("cuda"))
        );
        let demo = load("demo-scaling.toml");
        let grid: Vec<(u32, u64)> = demo.iter().map(|c| (c.spec.dataset.train_cases, c.spec.seed)).collect();
        assert_eq!(grid, [(4, 1), (4, 2), (8, 1), (8, 2), (16, 1), (16, 2)]);
    }
}
