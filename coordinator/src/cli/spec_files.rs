//! What the CLI resolves in a spec file before it sends it: the case-id list file a spec names
//! (read relative to the spec file, its ids sent in the spec, so the coordinator never reads a
//! client's files), and relative local dataset paths (made absolute, so one directory is one
//! dataset URL).

use std::path::Path;

use anyhow::Context;
use protocol::spec::RunSpec;

/// Replaces `dataset.case_list` by the ids it lists (`dataset.cases`), reading the file relative
/// to `spec_dir`. Errors name the file and line.
pub fn embed_case_list(spec: &mut RunSpec, spec_dir: &Path) -> anyhow::Result<()> {
    if let Some(list) = spec.dataset.case_list.take() {
        spec.dataset.cases = Some(read_case_list(&list, spec_dir)?);
    }
    Ok(())
}

/// `embed_case_list` for a sweep's inlined base spec, a TOML table.
pub fn embed_case_list_table(base: &mut toml::Table, spec_dir: &Path) -> anyhow::Result<()> {
    if let Some(toml::Value::Table(dataset)) = base.get_mut("dataset")
        && let Some(toml::Value::String(list)) = dataset.remove("case_list")
    {
        let ids = read_case_list(&list, spec_dir)?;
        dataset.insert(
            "cases".into(),
            toml::Value::Array(ids.into_iter().map(toml::Value::String).collect()),
        );
    }
    Ok(())
}

fn read_case_list(list: &str, spec_dir: &Path) -> anyhow::Result<Vec<String>> {
    let path = spec_dir.join(list);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("field `dataset.case_list`: cannot read {}", path.display()))?;
    data::split::parse_case_list(&text, &path.display().to_string())
        .map_err(|e| anyhow::anyhow!("field `dataset.case_list`: {e}"))
}

/// `cwd/rel` without `.` components, so `./atlas` and `atlas` name one dataset URL (datasets
/// and quarantine are keyed by the URL string).
pub fn under_cwd(cwd: &Path, rel: &str) -> String {
    let joined: std::path::PathBuf = cwd
        .join(rel)
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    joined.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_case_list_is_read_relative_to_the_spec_and_embedded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lists")).unwrap();
        std::fs::write(
            dir.path().join("lists/sub.txt"),
            "# two\nBDMAP_00000002\nBDMAP_00000004\n",
        )
        .unwrap();
        let text = "name='t'\nworld_size=1\n[dataset]\nname='atlas'\ncase_list='lists/sub.txt'\n\
                    [model]\narch='unet'\ndepth=2\n[train]\nsteps=2\npatch=[8,8,8]\nlr=0.1\n[artifacts]\nurl='/y'\n";
        let mut spec = RunSpec::from_toml(text, "t").unwrap();
        embed_case_list(&mut spec, dir.path()).unwrap();
        assert_eq!(spec.dataset.case_list, None);
        assert_eq!(
            spec.dataset.cases.as_deref().unwrap(),
            ["BDMAP_00000002", "BDMAP_00000004"]
        );
        RunSpec::from_toml(&spec.to_toml(), "canonical").unwrap();

        std::fs::write(dir.path().join("lists/bad.txt"), "BDMAP_1\nBD MAP\n").unwrap();
        let mut spec = RunSpec::from_toml(&text.replace("sub.txt", "bad.txt"), "t").unwrap();
        let err = embed_case_list(&mut spec, dir.path()).unwrap_err().to_string();
        assert!(err.contains("dataset.case_list") && err.contains("bad.txt:2"), "{err}");
        let mut spec = RunSpec::from_toml(&text.replace("sub.txt", "none.txt"), "t").unwrap();
        let err = format!("{:#}", embed_case_list(&mut spec, dir.path()).unwrap_err());
        assert!(err.contains("none.txt"), "{err}");
    }

    #[test]
    fn relative_paths_lose_their_dot_components() {
        assert_eq!(under_cwd(Path::new("/w"), "./atlas/./x"), "/w/atlas/x");
        assert_eq!(under_cwd(Path::new("/w"), "atlas"), "/w/atlas");
    }
}
