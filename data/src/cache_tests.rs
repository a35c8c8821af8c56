use std::process::Command;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::patch::{CropConfig, sample_patch};

const CONFIG: &str = "spacing=1.5;window=-175..250;test";

/// A deterministic stand-in for the preprocessing: a small phantom derived from the case id.
fn prepare(case_id: &str) -> Prepared {
    let seed = case_id
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    let shape = [20, 18, 16];
    let n = 20 * 18 * 16;
    let image = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
        .map(|v| v as f32 / 999.0)
        .collect();
    let labels = (0..n)
        .map(|i| {
            if (i as u32 ^ seed).is_multiple_of(5) {
                1 << ((i as u32 + seed) % 25)
            } else {
                0
            }
        })
        .collect();
    (shape, image, labels)
}

fn fresh(case_id: &str) -> CaseVolume {
    let (shape, image, labels) = prepare(case_id);
    CaseVolume::new(case_id.into(), shape, image, labels)
}

fn file_size() -> u64 {
    let vol = fresh("BDMAP_00000001");
    Layout::of(vol.voxel_count(), vol.foreground().len()).total as u64
}

fn get(cache: &VolumeCache, id: &str) -> (Arc<CaseVolume>, Source) {
    cache.get_or_prepare(id, CONFIG, || Ok(prepare(id))).expect("get")
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

#[test]
fn a_miss_writes_a_file_that_maps_back_to_the_same_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = VolumeCache::new(dir.path(), 1 << 30, 2).expect("cache");
    let (cold, source) = get(&cache, "BDMAP_00000001");
    assert_eq!(source, Source::Prepared);
    assert!(cold.is_mapped(), "the cold path returns the mapped file");
    assert_eq!(*cold, fresh("BDMAP_00000001"));
    assert_eq!(get(&cache, "BDMAP_00000001").1, Source::Memory);
    let other = VolumeCache::new(dir.path(), 1 << 30, 2).expect("cache");
    let (warm, source) = other
        .get_or_prepare("BDMAP_00000001", CONFIG, || panic!("a hit never prepares"))
        .expect("warm");
    assert_eq!(source, Source::Disk);
    assert_eq!(*warm, *cold);
    // Cold, warm and uncached volumes give bit-identical crops.
    let cfg = CropConfig::suprem([8, 8, 8]);
    let uncached = VolumeCache::disabled(1);
    let (plain, _) = get(&uncached, "BDMAP_00000001");
    assert!(!plain.is_mapped());
    for index in 0..50 {
        let patch = |v: &CaseVolume| sample_patch(v, &cfg, &mut ChaCha8Rng::seed_from_u64(index));
        assert_eq!(patch(&cold), patch(&warm));
        assert_eq!(patch(&cold), patch(&plain));
    }
    // Another config is another entry.
    let (_, source) = cache
        .get_or_prepare("BDMAP_00000001", "other config", || Ok(prepare("BDMAP_00000001")))
        .expect("get");
    assert_eq!(source, Source::Prepared);
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn eviction_keeps_the_cache_under_its_limit_and_drops_the_least_recently_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 3 * file_size() + file_size() / 2;
    // One open volume, so hits go to the disk and refresh recency there.
    let cache = VolumeCache::new(dir.path(), limit, 1).expect("cache");
    let ids = ["BDMAP_00000001", "BDMAP_00000002", "BDMAP_00000003", "BDMAP_00000004"];
    let pause = || std::thread::sleep(Duration::from_millis(20));
    for id in &ids[..3] {
        assert_eq!(get(&cache, id).1, Source::Prepared);
        pause();
    }
    // Use 1 again: 2 is now the least recently used.
    assert_eq!(get(&cache, ids[0]).1, Source::Disk);
    pause();
    assert_eq!(get(&cache, ids[3]).1, Source::Prepared);
    assert!(cache.usage().expect("usage") <= limit);
    let present = |id: &str| cache.file_path(id, CONFIG).expect("path").exists();
    assert!(!present(ids[1]), "the least recently used is evicted");
    assert!(present(ids[0]) && present(ids[2]) && present(ids[3]));
    // A limit below one file: nothing is cached, the volume still comes back.
    let tiny = VolumeCache::new(dir.path().join("tiny"), file_size() - 1, 1).expect("cache");
    let (vol, _) = get(&tiny, ids[0]);
    assert_eq!(*vol, fresh(ids[0]));
    assert_eq!(tiny.usage().expect("usage"), 0);
    assert_eq!(cache.open_volumes(), 1);
}

#[test]
fn a_corrupt_or_truncated_file_is_detected_and_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = "BDMAP_00000007";
    let path = VolumeCache::new(dir.path(), 1 << 30, 1)
        .expect("cache")
        .file_path(id, CONFIG)
        .expect("path");
    let good = {
        get(&VolumeCache::new(dir.path(), 1 << 30, 1).expect("cache"), id);
        fs::read(&path).expect("read")
    };
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: Vec<(&str, Damage)> = vec![
        ("truncated", Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2))),
        ("one byte short", Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 1))),
        ("empty", Box::new(|b: &mut Vec<u8>| b.clear())),
        ("bad magic", Box::new(|b: &mut Vec<u8>| b[0] ^= 0xff)),
        ("other version", Box::new(|b: &mut Vec<u8>| b[8] = b[8].wrapping_add(1))),
        ("header bit flip", Box::new(|b: &mut Vec<u8>| b[20] ^= 1)),
        (
            "trailing garbage",
            Box::new(|b: &mut Vec<u8>| b.extend_from_slice(&[1, 2, 3])),
        ),
    ];
    for (what, damage) in damages {
        let mut bytes = good.clone();
        damage(&mut bytes);
        fs::write(&path, &bytes).expect("write");
        assert!(
            open_case_file(&path, id, &config_digest(CONFIG)).is_err(),
            "{what}: accepted"
        );
        let cache = VolumeCache::new(dir.path(), 1 << 30, 1).expect("cache");
        let (vol, source) = get(&cache, id);
        assert_eq!(source, Source::Prepared, "{what}: trusted");
        assert_eq!(*vol, fresh(id), "{what}");
        assert_eq!(fs::read(&path).expect("read"), good, "{what}: rebuilt file differs");
    }
    // A file of another case under this name is not trusted either.
    let other = dir.path().join("other");
    fs::create_dir_all(&other).expect("mkdir");
    let digest = config_digest(CONFIG);
    write_case_file(&other, "x.vfc", &fresh("BDMAP_00000008"), &digest).expect("write");
    assert!(open_case_file(&other.join("x.vfc"), id, &digest).is_err());
    assert!(open_case_file(&other.join("x.vfc"), "BDMAP_00000008", &config_digest("no")).is_err());
}

const CHILD_ENV: &str = "VOXELFLEET_CACHE_TEST_CHILD";
const CASES_A: [&str; 4] = ["BDMAP_00000001", "BDMAP_00000002", "BDMAP_00000003", "BDMAP_00000004"];
const CASES_B: [&str; 4] = ["BDMAP_00000004", "BDMAP_00000003", "BDMAP_00000005", "BDMAP_00000001"];

/// The child side of `two_processes_warming_one_cache_leave_it_intact`: does nothing unless the
/// parent started this binary with `CHILD_ENV=role:dir`.
#[test]
fn cache_child_process() {
    let Ok(job) = std::env::var(CHILD_ENV) else { return };
    let (role, dir) = job.split_once(':').expect("role:dir");
    let dir = Path::new(dir);
    match role {
        // Warm through the cache, several threads, checking every volume against a fresh one.
        "a" | "b" => {
            let cases = if role == "a" { CASES_A } else { CASES_B };
            let cache = VolumeCache::new(dir, 1 << 30, 2).expect("cache");
            std::thread::scope(|s| {
                for t in 0..3 {
                    let cache = &cache;
                    s.spawn(move || {
                        for round in 0..3 {
                            for k in 0..cases.len() {
                                let id = cases[(k + t + round) % cases.len()];
                                let (vol, _) = cache
                                    .get_or_prepare(id, CONFIG, || {
                                        std::thread::sleep(Duration::from_millis(30));
                                        Ok(prepare(id))
                                    })
                                    .expect("get");
                                assert_eq!(*vol, fresh(id), "{role}: {id}");
                            }
                        }
                    });
                }
            });
        }
        // Bypass the locks: rewrite one entry over and over, as racing preparers would.
        "writer" => {
            let digest = config_digest(CONFIG);
            let name = file_name(CASES_A[0], &digest);
            let vol = fresh(CASES_A[0]);
            for _ in 0..40 {
                write_case_file(dir, &name, &vol, &digest).expect("write");
            }
        }
        // Meanwhile, every open of that entry sees a whole, valid file or none.
        "reader" => {
            let digest = config_digest(CONFIG);
            let path = dir.join(file_name(CASES_A[0], &digest));
            let expected = fresh(CASES_A[0]);
            for _ in 0..400 {
                if let Some(vol) = open_case_file(&path, CASES_A[0], &digest).expect("never a partial file") {
                    assert_eq!(vol, expected);
                }
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn two_processes_warming_one_cache_leave_it_intact() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let spawn = |role: &str| {
        Command::new(&exe)
            .args([
                "--exact",
                "cache::tests::cache_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{role}:{}", dir.path().display()))
            .spawn()
            .expect("spawn child")
    };
    let children = [
        spawn("a"),
        spawn("b"),
        spawn("writer"),
        spawn("writer"),
        spawn("reader"),
    ];
    for mut child in children {
        assert!(child.wait().expect("wait").success(), "a child process failed");
    }
    let digest = config_digest(CONFIG);
    let mut ids: Vec<&str> = CASES_A.iter().chain(&CASES_B).copied().collect();
    ids.sort();
    ids.dedup();
    for id in &ids {
        let path = dir.path().join(file_name(id, &digest));
        let vol = open_case_file(&path, id, &digest).expect("valid").expect("present");
        assert_eq!(vol, fresh(id), "{id}");
    }
    assert!(
        leftovers(dir.path()).is_empty(),
        "temp files left: {:?}",
        leftovers(dir.path())
    );
    let files = fs::read_dir(dir.path())
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == EXTENSION))
        })
        .count();
    assert_eq!(files, ids.len());
}

/// Figures for the report: `cargo test --release -p data cache_hit_read_time -- --ignored
/// --nocapture`. A 64³ phantom case, read cold (prepare, write, map) and warm (validate, map)
/// from a fresh process view, then one 64³ crop from the mapping.
#[test]
#[ignore]
fn cache_hit_read_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let synth = crate::SynthOptions {
        cases: 1,
        ..crate::SynthOptions::default()
    };
    let ids = crate::write_phantom_dataset(&dir.path().join("ds"), &synth).expect("phantom");
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("ds")).expect("store");
    let root = object_store::path::Path::default();
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let load = || runtime.block_on(crate::loader::load_case_parts(&store, &root, &ids[0]));
    let cache_dir = dir.path().join("cache");
    let t = std::time::Instant::now();
    let (cold, source) = VolumeCache::new(&cache_dir, 1 << 30, 1)
        .expect("cache")
        .get_or_prepare(&ids[0], CONFIG, load)
        .expect("cold");
    let cold_s = t.elapsed().as_secs_f64();
    assert_eq!(source, Source::Prepared);
    assert_eq!(cold.shape, [64, 64, 64]);
    let reps = 200;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        let cache = VolumeCache::new(&cache_dir, 1 << 30, 1).expect("cache");
        let (warm, source) = cache.get_or_prepare(&ids[0], CONFIG, || panic!("hit")).expect("warm");
        assert_eq!(source, Source::Disk);
        assert_eq!(warm.shape, cold.shape);
    }
    let warm_s = t.elapsed().as_secs_f64() / reps as f64;
    let cfg = CropConfig::suprem([64, 64, 64]);
    let t = std::time::Instant::now();
    for i in 0..reps {
        sample_patch(&cold, &cfg, &mut ChaCha8Rng::seed_from_u64(i));
    }
    let crop_s = t.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "64^3 case: cold (load + quantise + write + map) {:.2} ms, warm hit (open + validate + map) {:.3} ms, 64^3 crop {:.2} ms, file {} bytes",
        cold_s * 1e3,
        warm_s * 1e3,
        crop_s * 1e3,
        fs::metadata(
            VolumeCache::new(&cache_dir, 1 << 30, 1)
                .expect("c")
                .file_path(&ids[0], CONFIG)
                .expect("p")
        )
        .expect("m")
        .len()
    );
}
