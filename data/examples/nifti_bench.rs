//! Decompression and decode throughput on a real-sized CT: `cargo run --release -p data --example
//! nifti_bench -- FILE.nii.gz`. Make one with `bench/preprocess/gen_volumes.py OUT --cases 1
//! --seed 0` (a 512×512×200 int16 abdominal phantom at 0.8×0.8×2.5 mm in LPS, written by nibabel)
//! and pass `OUT/BDMAP_00000001/ct.nii.gz`. Prints the best of 3 runs of each stage.

use std::io::Read;
use std::time::Instant;

use data::nifti_read::{decode, fetch_volume};

fn best<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = None;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(v);
    }
    (best, out.expect("ran"))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let path = std::env::args().nth(1).expect("usage: nifti_bench FILE.nii.gz");
    let gz = std::fs::read(&path).expect("read file");
    let (t_inflate, raw) = best(|| {
        let mut raw = Vec::new();
        flate2::read::MultiGzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .expect("inflate");
        raw
    });
    let mb = raw.len() as f64 / 1e6;
    println!(
        "inflate: {:.1} MB compressed -> {mb:.1} MB in {t_inflate:.3} s = {:.0} MB/s decompressed",
        gz.len() as f64 / 1e6,
        mb / t_inflate
    );
    let (t_raw, v) = best(|| decode::<f32>(&raw, "raw.nii").expect("decode"));
    println!("decode .nii (no gzip) -> f32 {:?}: {t_raw:.3} s", v.shape);
    let (t_mask, _) = best(|| decode::<u8>(&raw, "raw.nii").expect("decode"));
    println!("decode .nii (no gzip) -> u8 mask: {t_mask:.3} s");
    let (t_gz, _) = best(|| decode::<f32>(&gz, "ct.nii.gz").expect("decode"));
    println!("decode .nii.gz in memory -> f32: {t_gz:.3} s");
    let dir = std::path::Path::new(&path).parent().expect("dir").to_path_buf();
    let name = std::path::Path::new(&path)
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).expect("store");
    let key = object_store::path::Path::from(name);
    let mut best_fetch = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let v = fetch_volume::<f32>(&store, &key).await.expect("fetch");
        best_fetch = best_fetch.min(t.elapsed().as_secs_f64());
        assert_eq!(v.voxel_count(), raw.len().saturating_sub(352) / 2);
    }
    println!("fetch_volume (local file store, streamed) -> f32: {best_fetch:.3} s");
}
