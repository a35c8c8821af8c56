//! `coordinator dataset inspect FILE_OR_URL [--json]`: what a NIfTI file holds, as nibabel
//! would read it, so an operator can check a case (its orientation, spacing, scaling, value
//! range, NaNs) without Python. It reads through the same streamed reader the workers use.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use data::nifti_read::{NiftiImage, fetch_image};
use object_store::path::Path;

/// Splits `target` into a dataset URL (or local directory) and the object key of the file.
fn locate(target: &str) -> anyhow::Result<(String, Path)> {
    let is_url = url::Url::parse(target).is_ok_and(|u| u.scheme().len() > 1);
    if is_url {
        let (base, key) = target
            .rsplit_once('/')
            .filter(|(_, key)| !key.is_empty())
            .with_context(|| format!("{target}: a URL must end in the file's name"))?;
        let key = Path::from_url_path(key).with_context(|| format!("{target}: bad object key"))?;
        return Ok((base.to_string(), key));
    }
    let path = std::path::Path::new(target);
    if path.is_dir() {
        anyhow::bail!(
            "{target} is a directory; inspect reads one NIfTI file: {}",
            files_in(path)
        );
    }
    anyhow::ensure!(
        path.is_file(),
        "{target}: no such file; give a local .nii or .nii.gz file, or a dataset URL ending in the \
         file's key (file:///data/atlas/BDMAP_00000001/ct.nii.gz)"
    );
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{target}: not a UTF-8 file name"))?;
    let key = Path::from_url_path(name).with_context(|| format!("{target}: bad file name"))?;
    Ok((dir.display().to_string(), key))
}

/// What to inspect in a directory: its NIfTI files (a case folder's CT first), or how to name one.
fn files_in(dir: &std::path::Path) -> String {
    let nifti = |p: &std::path::Path| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        name.ends_with(".nii.gz") || name.ends_with(".nii")
    };
    let mut found: Vec<std::path::PathBuf> = [dir.to_path_buf(), dir.join("segmentations")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| nifti(p))
        .collect();
    found.sort_by_key(|p| (!p.ends_with("ct.nii.gz"), p.clone()));
    if found.is_empty() {
        return format!(
            "it holds no .nii or .nii.gz file; give a file's path, like {}",
            dir.join("ct.nii.gz").display()
        );
    }
    let more = found.len().saturating_sub(3);
    let shown: Vec<String> = found.iter().take(3).map(|p| p.display().to_string()).collect();
    format!(
        "give one of its files, like {}{}",
        shown.join(", "),
        if more > 0 {
            format!(" ({more} more)")
        } else {
            String::new()
        }
    )
}

struct Stats {
    min: f64,
    max: f64,
    mean: f64,
    nan: usize,
}

fn stats(values: &[f32]) -> Stats {
    let (mut min, mut max, mut sum, mut n, mut nan) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, 0usize, 0usize);
    for &v in values {
        if v.is_nan() {
            nan += 1;
            continue;
        }
        let v = v as f64;
        min = min.min(v);
        max = max.max(v);
        sum += v;
        n += 1;
    }
    let mean = if n > 0 { sum / n as f64 } else { f64::NAN };
    Stats { min, max, mean, nan }
}

pub async fn inspect(target: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (url, key) = locate(target)?;
    let (store, root) = data::store_from_url(&url).with_context(|| format!("{target}: opening {url}"))?;
    let key = Path::from_iter(root.parts().chain(key.parts()));
    let image: NiftiImage<f32> = fetch_image(store.as_ref(), &key)
        .await
        .with_context(|| format!("inspecting {target}"))?;
    let h = &image.header;
    let v = &image.volume;
    let s = stats(&v.data);
    let axcodes: String = data::geometry::axcodes(&v.affine).iter().collect();
    let scaling = h.scaling(target)?;
    if json {
        let out = serde_json::json!({
            "file": target,
            "gzip": image.gzip,
            "shape": h.dims,
            "spacing": h.zooms,
            "affine_spacing": v.spacing(),
            "axcodes": axcodes,
            "datatype": h.datatype.name(),
            "endianness": h.endianness.name(),
            "scl_slope": h.scl_slope,
            "scl_inter": h.scl_inter,
            "scaled": scaling.is_some(),
            "sform_code": h.sform_code,
            "qform_code": h.qform_code,
            "affine_source": image.affine_source.name(),
            "affine": v.affine,
            "min": s.min,
            "max": s.max,
            "mean": s.mean,
            "nan_count": s.nan,
            "description": h.descrip,
        });
        return emit(serde_json::to_string_pretty(&out)? + "\n");
    }
    let mut out = String::new();
    let dims: Vec<String> = h.dims.iter().map(|d| d.to_string()).collect();
    let [sx, sy, sz] = h.zooms;
    writeln!(out, "file         {target}{}", if image.gzip { " (gzip)" } else { "" })?;
    writeln!(out, "shape        {}  (x, y, z)", dims.join(" x "))?;
    writeln!(out, "spacing      {sx:.4} x {sy:.4} x {sz:.4} mm")?;
    writeln!(out, "orientation  {axcodes}")?;
    writeln!(
        out,
        "datatype     {} ({}-endian)",
        h.datatype.name(),
        h.endianness.name()
    )?;
    writeln!(
        out,
        "scaling      scl_slope {} scl_inter {}{}",
        h.scl_slope,
        h.scl_inter,
        if scaling.is_some() { "" } else { " (values unscaled)" }
    )?;
    writeln!(
        out,
        "transforms   sform_code {} qform_code {}; affine from {}",
        h.sform_code,
        h.qform_code,
        image.affine_source.name()
    )?;
    for (i, row) in v.affine.iter().enumerate() {
        let label = if i == 0 { "affine" } else { "" };
        writeln!(
            out,
            "{label:<12} [{:>10.4} {:>10.4} {:>10.4} {:>10.4}]",
            row[0], row[1], row[2], row[3]
        )?;
    }
    writeln!(
        out,
        "values       min {:.4} max {:.4} mean {:.4} NaN {}",
        s.min, s.max, s.mean, s.nan
    )?;
    emit(out)
}

/// Writes the report; a closed pipe (`inspect ... | head`) is not an error.
fn emit(text: String) -> anyhow::Result<ExitCode> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_dataset_and_key() {
        let (base, key) = locate("file:///data/atlas/BDMAP_1/ct.nii.gz").expect("url");
        assert_eq!(base, "file:///data/atlas/BDMAP_1");
        assert_eq!(key.as_ref(), "ct.nii.gz");
        assert!(locate("s3://bucket/").is_err());
        assert!(locate("/definitely/not/here.nii.gz").is_err());
    }

    #[test]
    fn a_directory_is_refused_naming_the_files_to_give_instead() {
        let dir = tempfile::tempdir().unwrap();
        let case = dir.path().join("BDMAP_00000001");
        std::fs::create_dir_all(case.join("segmentations")).unwrap();
        std::fs::write(case.join("segmentations").join("liver.nii.gz"), b"x").unwrap();
        std::fs::write(case.join("ct.nii.gz"), b"x").unwrap();
        let err = locate(case.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        // The CT comes first: it is what an operator usually means.
        let ct = case.join("ct.nii.gz").display().to_string();
        let liver = case.join("segmentations").join("liver.nii.gz").display().to_string();
        assert!(err.find(&ct).unwrap() < err.find(&liver).unwrap(), "{err}");

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = locate(empty.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("holds no .nii"), "{err}");
        let err = locate("/definitely/not/here.nii.gz").unwrap_err().to_string();
        assert!(err.contains("no such file") && err.contains("file://"), "{err}");
    }

    #[test]
    fn stats_skip_nans_and_count_them() {
        let s = stats(&[1.0, f32::NAN, -3.0, 5.0]);
        assert_eq!((s.min, s.max, s.mean, s.nan), (-3.0, 5.0, 1.0, 1));
    }
}
