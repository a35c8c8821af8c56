//! What the CLI resolves in a spec file before it sends it: relative local paths (made
//! absolute against the directory of the file that wrote them, so a spec means the same data from
//! any working directory, and one directory is one dataset URL), and the case-id list file a spec
//! names (read there, its ids sent in the spec, so the coordinator never reads a client's files).
//! Every file is read through a size cap: a spec that names `/dev/zero` must fail fast, naming it.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use coordinator::sweep::lookup_mut;
use protocol::spec::RunSpec;
use toml::{Table, Value};

/// Largest run spec, sweep or base file read: real ones are a few KiB.
pub const SPEC_FILE_CAP: u64 = 1 << 20;
/// Largest case-id list read: ~140,000 AbdomenAtlas ids (AbdomenAtlas 1.1 has 9,262). Its ids
/// travel inside the spec, and the control RPCs take messages up to 4 MiB.
pub const CASE_LIST_CAP: u64 = 2 << 20;

/// Keys of a run spec that hold a local path or an object-store URL, by TOML path.
const PATH_KEYS: [&str; 3] = ["dataset.url", "artifacts.url", "model.init_from"];
const CASE_LIST: &str = "dataset.case_list";

/// Reads a text file of at most `cap` bytes, `what` naming it in errors. The cap is enforced on
/// what is read, not on the file's stated size (`/dev/zero` and pipes state 0).
pub fn read_capped(path: &Path, cap: u64, what: &str) -> anyhow::Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if bytes.len() as u64 > cap {
        bail!(
            "{what} {} is larger than {} KiB, the most read for one; is it the right file?",
            path.display(),
            cap / 1024
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{what} {} is not UTF-8 text (invalid byte at offset {}); is it the right file?",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The absolute directory of `file`, against which its relative paths resolve.
pub fn dir_of(file: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(file).with_context(|| format!("resolving {}", file.display()))?;
    Ok(absolute.parent().map(Path::to_path_buf).unwrap_or(absolute))
}

/// Makes the relative local paths of a parsed spec (dataset and artifacts URLs, `model.init_from`)
/// absolute against `dir`, and embeds the ids of its `dataset.case_list`, read there.
pub fn resolve_spec(spec: &mut RunSpec, dir: &Path) -> anyhow::Result<()> {
    let init_from = spec.model.init_from_mut().as_mut();
    for url in [&mut spec.dataset.url, &mut spec.artifacts.url]
        .into_iter()
        .chain(init_from)
    {
        if let Some(absolute) = absolute_in(dir, url) {
            *url = absolute;
        }
    }
    if let Some(list) = spec.dataset.case_list.take() {
        spec.dataset.cases = Some(read_case_list(&list, dir)?);
    }
    Ok(())
}

/// `resolve_spec` for a spec as a TOML table (a sweep's base).
pub fn resolve_table(spec: &mut Table, dir: &Path) -> anyhow::Result<()> {
    for key in PATH_KEYS {
        if let Some(Value::String(url)) = lookup_mut(spec, key)
            && let Some(absolute) = absolute_in(dir, url)
        {
            *url = absolute;
        }
    }
    if let Some(Value::Table(dataset)) = spec.get_mut("dataset")
        && let Some(Value::String(list)) = dataset.remove("case_list")
    {
        let ids = read_case_list(&list, dir)?;
        dataset.insert(
            "cases".into(),
            Value::Array(ids.into_iter().map(Value::String).collect()),
        );
    }
    Ok(())
}

/// `resolve_table` for the values of a sweep axis over `key`, written in a file in `dir`: a path
/// axis (`dataset.url`) or a table axis holding one (`dataset = [{ url = ... }]`).
pub fn resolve_axis(key: &str, values: &mut [Value], dir: &Path) -> anyhow::Result<()> {
    if key == CASE_LIST {
        bail!(
            "axis `{key}`: a case list is read from the base spec only; give the ids as \
             `dataset.cases` values, or one sweep per list"
        );
    }
    let touches = |path: &str| path == key || path.starts_with(&format!("{key}."));
    if !PATH_KEYS.iter().any(|p| touches(p)) && !touches(CASE_LIST) {
        return Ok(());
    }
    for value in values {
        // The value set in an otherwise empty spec table, resolved there and taken back.
        let mut spec = Table::new();
        let (parents, leaf) = key.rsplit_once('.').map_or((None, key), |(p, l)| (Some(p), l));
        let mut here = &mut spec;
        for part in parents.into_iter().flat_map(|p| p.split('.')) {
            here = match here.entry(part).or_insert_with(|| Value::Table(Table::new())) {
                Value::Table(t) => t,
                _ => unreachable!("only tables were inserted"),
            };
        }
        here.insert(leaf.into(), value.clone());
        resolve_table(&mut spec, dir).with_context(|| format!("axis `{key}` = {value}"))?;
        *value = lookup_mut(&mut spec, key)
            .expect("resolving keeps the axis key")
            .clone();
    }
    Ok(())
}

/// `dir/rel` when `rel` is a relative local path; None for URLs (`s3://`, `file:///`), absolute
/// paths and the empty URL of a spec that names its dataset by `dataset.name`.
fn absolute_in(dir: &Path, rel: &str) -> Option<String> {
    (!rel.is_empty() && !rel.contains("://") && Path::new(rel).is_relative()).then(|| under_cwd(dir, rel))
}

fn read_case_list(list: &str, spec_dir: &Path) -> anyhow::Result<Vec<String>> {
    let path = spec_dir.join(list);
    let text = read_capped(&path, CASE_LIST_CAP, "case list").context("field `dataset.case_list`")?;
    data::split::parse_case_list(&text, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("field `dataset.case_list`: {e}"))
}

/// `cwd/rel` without `.` components and with `..` taken off the path before it (lexically, as
/// the user reads the path), so `./atlas`, `atlas` and `x/../atlas` name one dataset URL
/// (datasets and quarantine are keyed by the URL string).
pub fn under_cwd(cwd: &Path, rel: &str) -> String {
    let mut joined = PathBuf::new();
    for c in cwd.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(joined.components().next_back(), Some(Component::Normal(_))) => {
                joined.pop();
            }
            // `/..` is `/`.
            Component::ParentDir if joined.has_root() => {}
            other => joined.push(other),
        }
    }
    joined.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = "name='t'\nworld_size=1\n[dataset]\nname='atlas'\ncase_list='lists/sub.txt'\n\
                        [model]\narch='unet'\ndepth=2\n[train]\nsteps=2\npatch=[8,8,8]\nlr=0.1\n[artifacts]\nurl='/y'\n";

    #[test]
    fn a_spec_case_list_is_read_relative_to_the_spec_and_embedded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lists")).unwrap();
        std::fs::write(
            dir.path().join("lists/sub.txt"),
            "# two\nBDMAP_00000002\nBDMAP_00000004\n",
        )
        .unwrap();
        let mut spec = RunSpec::from_toml(SPEC, "t").unwrap();
        resolve_spec(&mut spec, dir.path()).unwrap();
        assert_eq!(spec.dataset.case_list, None);
        assert_eq!(
            spec.dataset.cases.as_deref().unwrap(),
            ["BDMAP_00000002", "BDMAP_00000004"]
        );
        RunSpec::from_toml(&spec.to_toml(), "canonical").unwrap();

        std::fs::write(dir.path().join("lists/bad.txt"), "BDMAP_1\nBD MAP\n").unwrap();
        let mut spec = RunSpec::from_toml(&SPEC.replace("sub.txt", "bad.txt"), "t").unwrap();
        let err = resolve_spec(&mut spec, dir.path()).unwrap_err().to_string();
        assert!(err.contains("dataset.case_list") && err.contains("bad.txt:2"), "{err}");
        let mut spec = RunSpec::from_toml(&SPEC.replace("sub.txt", "none.txt"), "t").unwrap();
        let err = format!("{:#}", resolve_spec(&mut spec, dir.path()).unwrap_err());
        assert!(err.contains("none.txt"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_files_directory_and_urls_stay() {
        let text = SPEC
            .replace("name='atlas'\ncase_list='lists/sub.txt'", "url='../data/atlas'")
            .replace("depth=2", "depth=2\ninit_from='models/m'")
            .replace("url='/y'", "url='s3://bucket/art'");
        let mut spec = RunSpec::from_toml(&text, "t").unwrap();
        resolve_spec(&mut spec, Path::new("/w/configs")).unwrap();
        assert_eq!(spec.dataset.url, "/w/data/atlas");
        assert_eq!(spec.model.init_from(), Some("/w/configs/models/m"));
        assert_eq!(spec.artifacts.url, "s3://bucket/art");

        let mut table: Table = toml::from_str(&text).unwrap();
        resolve_table(&mut table, Path::new("/w/configs")).unwrap();
        assert_eq!(table["dataset"]["url"].as_str(), Some("/w/data/atlas"));
        assert_eq!(table["model"]["init_from"].as_str(), Some("/w/configs/models/m"));
        assert_eq!(table["artifacts"]["url"].as_str(), Some("s3://bucket/art"));
    }

    #[test]
    fn axis_values_holding_paths_resolve_and_others_stay() {
        let dir = Path::new("/w/sweeps");
        let mut urls = vec![Value::from("a"), Value::from("/abs"), Value::from("file:///f")];
        resolve_axis("dataset.url", &mut urls, dir).unwrap();
        assert_eq!(urls, [Value::from("/w/sweeps/a"), "/abs".into(), "file:///f".into()]);
        let mut tables: Vec<Value> = vec![toml::from_str::<Table>("url = './d'\neval_cases = 2").unwrap().into()];
        resolve_axis("dataset", &mut tables, dir).unwrap();
        assert_eq!(tables[0]["url"].as_str(), Some("/w/sweeps/d"));
        assert_eq!(tables[0]["eval_cases"].as_integer(), Some(2));
        let mut seeds = vec![Value::from(1)];
        resolve_axis("seed", &mut seeds, dir).unwrap();
        assert_eq!(seeds, [Value::from(1)]);
        let err = resolve_axis("dataset.case_list", &mut [Value::from("l.txt")], dir).unwrap_err();
        assert!(err.to_string().contains("axis `dataset.case_list`"), "{err}");
    }

    #[test]
    fn files_are_read_up_to_a_cap_that_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.toml");
        std::fs::write(&small, "a = 1\n").unwrap();
        assert_eq!(read_capped(&small, 6, "run spec").unwrap(), "a = 1\n");
        let err = read_capped(&small, 5, "run spec").unwrap_err().to_string();
        assert!(err.contains("run spec") && err.contains("small.toml"), "{err}");
        // A device that states size 0 and never ends.
        let started = std::time::Instant::now();
        let err = read_capped(Path::new("/dev/zero"), SPEC_FILE_CAP, "base spec")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/zero") && err.contains("1024 KiB"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let binary = dir.path().join("bin.toml");
        std::fs::write(&binary, [b'a', 0xff, b'b']).unwrap();
        let err = read_capped(&binary, 10, "sweep file").unwrap_err().to_string();
        assert!(err.contains("bin.toml") && err.contains("UTF-8"), "{err}");
        // Case lists have their own, larger cap.
        std::fs::write(
            dir.path().join("huge.txt"),
            "BDMAP_00000001\n".repeat((CASE_LIST_CAP / 15 + 1) as usize),
        )
        .unwrap();
        let mut spec = RunSpec::from_toml(&SPEC.replace("lists/sub.txt", "huge.txt"), "t").unwrap();
        let err = format!("{:#}", resolve_spec(&mut spec, dir.path()).unwrap_err());
        assert!(err.contains("huge.txt") && err.contains("2048 KiB"), "{err}");
    }

    #[test]
    fn relative_paths_lose_their_dot_components() {
        assert_eq!(under_cwd(Path::new("/w"), "./atlas/./x"), "/w/atlas/x");
        assert_eq!(under_cwd(Path::new("/w"), "atlas"), "/w/atlas");
        assert_eq!(under_cwd(Path::new("/w/configs"), "../demo/dataset"), "/w/demo/dataset");
        assert_eq!(under_cwd(Path::new("/w"), "../../x"), "/x");
    }
}
