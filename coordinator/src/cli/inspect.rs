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
    anyhow::ensure!(path.is_file(), "{target}: no such file");
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
    fn stats_skip_nans_and_count_them() {
        let s = stats(&[1.0, f32::NAN, -3.0, 5.0]);
        assert_eq!((s.min, s.max, s.mean, s.nan), (-3.0, 5.0, 1.0, 1));
    }
}
