//! The node-wide case cache under the fault probe's damage: case files whose foreground section
//! was overwritten under an intact header are rebuilt, not trained on, so a run on the damaged
//! cache ends with exactly the weights of a run on a clean one.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{Cluster, FinalCheckpoint};

/// One single-rank run of `steps` steps on a fresh worker process; its final checkpoint.
fn train(cluster: &mut Cluster, name: &str) -> FinalCheckpoint {
    cluster.spawn_workers(1);
    let spec = cluster.write_spec(name, 1, 4, "");
    let run_id = cluster.submit(&spec);
    let detail = cluster.wait_for_end(&run_id);
    assert_eq!(detail["run"]["state"], "Completed", "{detail}");
    cluster.wait_workers_exit(Duration::from_secs(30));
    cluster.final_checkpoint(&detail)
}

fn case_files(cluster: &Cluster) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cluster.path("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vfc"))
        .collect();
    files.sort();
    files
}

#[test]
fn a_run_on_a_cache_with_overwritten_sections_trains_exactly_as_on_a_clean_cache() {
    let mut cluster = Cluster::start();
    cluster.write_dataset(4);
    let clean = train(&mut cluster, "clean-cache");

    // Shift every file's foreground indices by one place, leaving the header untouched: every
    // index is still a valid voxel, so only a checksum can tell.
    let files = case_files(&cluster);
    assert!(!files.is_empty(), "the first run filled the cache");
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let mut shifted = 0;
    for (file, bytes) in files.iter().zip(&originals) {
        let at = |k: usize| u64::from_ne_bytes(bytes[k..k + 8].try_into().unwrap()) as usize;
        let (foreground, total) = (at(64), at(72));
        assert_eq!(total, bytes.len(), "{}: header layout", file.display());
        let mut damaged = bytes.clone();
        damaged[foreground..total].rotate_left(4);
        shifted += usize::from(damaged != *bytes);
        std::fs::write(file, &damaged).unwrap();
    }
    assert!(shifted > 0, "no file had foreground to shift");

    let after = train(&mut cluster, "damaged-cache");
    // The same weights, written as the same model.bin bytes by another process.
    assert_eq!(after, clean, "the damaged cache changed the run's final checkpoint");
    // Every damaged file was rebuilt, byte for byte.
    assert_eq!(case_files(&cluster), files);
    for (file, bytes) in files.iter().zip(&originals) {
        assert!(std::fs::read(file).unwrap() == *bytes, "{} not rebuilt", file.display());
    }
}
