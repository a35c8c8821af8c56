use std::process::Command;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::file::{PAGE, Section, read_verified};
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
    assert_eq!(*cold, fresh("BDMAP_00000001"));
    assert_eq!(get(&cache, "BDMAP_00000001").1, Source::Memory);
    let other = VolumeCache::new(dir.path(), 1 << 30, 2).expect("cache");
    let (warm, source) = other
        .get_or_prepare("BDMAP_00000001", CONFIG, || panic!("a hit never prepares"))
        .expect("warm");
    assert_eq!(source, Source::Disk);
    assert!(warm.is_mapped(), "a hit is the file's verified copy");
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
    let vol = fresh(id);
    let layout = Layout::of(vol.voxel_count(), vol.foreground().len());
    assert!(vol.foreground().len() > 2, "the phantom has foreground to shuffle");
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: Vec<(&str, Section, Damage)> = vec![
        (
            "truncated",
            Section::File,
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
        ),
        (
            "one byte short",
            Section::File,
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 1)),
        ),
        ("empty", Section::File, Box::new(|b: &mut Vec<u8>| b.clear())),
        ("bad magic", Section::Header, Box::new(|b: &mut Vec<u8>| b[0] ^= 0xff)),
        (
            "other version",
            Section::Header,
            Box::new(|b: &mut Vec<u8>| b[8] = b[8].wrapping_add(1)),
        ),
        (
            "header bit flip",
            Section::Header,
            Box::new(|b: &mut Vec<u8>| b[20] ^= 1),
        ),
        (
            "trailing garbage",
            Section::File,
            Box::new(|b: &mut Vec<u8>| b.extend_from_slice(&[1, 2, 3])),
        ),
        // The probe's case: data overwritten under an intact header, every value still plausible.
        (
            "image bit flip",
            Section::Image,
            Box::new(move |b: &mut Vec<u8>| b[layout.image + 2 * 777] ^= 1),
        ),
        (
            "labels bit flip",
            Section::Labels,
            Box::new(move |b: &mut Vec<u8>| b[layout.labels + 4 * 123 + 1] ^= 0x10),
        ),
        (
            "foreground overwritten, header intact",
            Section::Foreground,
            Box::new(move |b: &mut Vec<u8>| b[layout.foreground..layout.total].rotate_left(4)),
        ),
        (
            "last foreground index changed",
            Section::Foreground,
            Box::new(move |b: &mut Vec<u8>| b[layout.total - 4] ^= 1),
        ),
    ];
    for (what, section, damage) in damages {
        let mut bytes = good.clone();
        damage(&mut bytes);
        fs::write(&path, &bytes).expect("write");
        let rejected = read_verified(&path, id, &config_digest(CONFIG)).expect_err(what);
        assert_eq!(rejected.section, section, "{what}: {rejected:?}");
        let error = open_case_file(&path, id, &config_digest(CONFIG))
            .expect_err(what)
            .to_string();
        assert!(
            error.contains(&path.display().to_string()) && error.contains(&section.to_string()),
            "{what}: the error names neither the file nor the section: {error}"
        );
        let cache = VolumeCache::new(dir.path(), 1 << 30, 1).expect("cache");
        let (vol, source) = get(&cache, id);
        assert_eq!(source, Source::Prepared, "{what}: trusted");
        assert!(!source.is_hit(), "{what}: a rebuilt file counts as a miss");
        assert_eq!(*vol, fresh(id), "{what}");
        assert_eq!(fs::read(&path).expect("read"), good, "{what}: rebuilt file differs");
        assert_eq!(
            get(&VolumeCache::new(dir.path(), 1 << 30, 1).expect("cache"), id).1,
            Source::Disk
        );
    }
    // A file of another case under this name is not trusted either.
    let other = dir.path().join("other");
    fs::create_dir_all(&other).expect("mkdir");
    let digest = config_digest(CONFIG);
    write_case_file(&other, "x.vfc", &fresh("BDMAP_00000008"), &digest).expect("write");
    assert!(open_case_file(&other.join("x.vfc"), id, &digest).is_err());
    assert!(open_case_file(&other.join("x.vfc"), "BDMAP_00000008", &config_digest("no")).is_err());
}

/// Collects what a `tracing` subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn a_rebuilt_file_is_logged_naming_the_file_and_the_section() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = "BDMAP_00000009";
    let cache = VolumeCache::new(dir.path(), 1 << 30, 1).expect("cache");
    get(&cache, id);
    let path = cache.file_path(id, CONFIG).expect("path");
    let vol = fresh(id);
    let layout = Layout::of(vol.voxel_count(), vol.foreground().len());
    let mut bytes = fs::read(&path).expect("read");
    bytes[layout.foreground..layout.total].rotate_left(4);
    fs::write(&path, &bytes).expect("write");

    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .finish();
    let (rebuilt, source) = tracing::subscriber::with_default(subscriber, || {
        get(&VolumeCache::new(dir.path(), 1 << 30, 1).expect("cache"), id)
    });
    assert_eq!(source, Source::Prepared);
    assert_eq!(*rebuilt, vol);
    let log = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains(&path.display().to_string()))
        .unwrap_or_else(|| panic!("no warning names {}: {log:?}", path.display()));
    assert!(
        line.contains("foreground section") && line.contains("checksum mismatch"),
        "{line}"
    );
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
        // A volume read from the cache, then its file truncated under it, as the fault probe did:
        // the volume is still whole. Then files truncated while other reads are in flight.
        "truncate" => {
            let id = CASES_A[0];
            let digest = config_digest(CONFIG);
            get(&VolumeCache::new(dir, 1 << 30, 1).expect("cache"), id);
            let cache = VolumeCache::new(dir, 1 << 30, 1).expect("cache");
            let (vol, source) = get(&cache, id);
            assert_eq!(source, Source::Disk);
            let path = cache.file_path(id, CONFIG).expect("path");
            let truncate = |len: u64| {
                if let Ok(f) = File::options().write(true).open(&path) {
                    let _ = f.set_len(len);
                }
            };
            truncate(PAGE as u64);
            assert_eq!(*vol, fresh(id), "a volume read before the truncation");
            let expected = fresh(id);
            let name = file_name(id, &digest);
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let mut k = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        write_case_file(dir, &name, &expected, &digest).expect("write");
                        std::thread::sleep(Duration::from_micros(500 * (k % 5)));
                        truncate((k * 7919) % (file_size() - 1));
                        std::thread::sleep(Duration::from_micros(300));
                        k += 1;
                    }
                });
                let mut read = 0;
                for _ in 0..300 {
                    if let Ok(Some(vol)) = open_case_file(&path, id, &digest) {
                        std::thread::sleep(Duration::from_micros(300));
                        assert_eq!(vol, expected);
                        read += 1;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                eprintln!("truncate child: {read} of 300 reads got a whole file");
            });
        }
        other => panic!("unknown child role {other}"),
    }
}

/// Starts this test binary running only `cache_child_process` in `role` on `dir`.
fn spawn_child(role: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "cache::tests::cache_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{role}:{}", dir.display()))
        .spawn()
        .expect("spawn child")
}

#[test]
fn a_cache_file_truncated_under_a_reader_never_kills_the_process() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // In a child process, so that a SIGBUS fails this test instead of the whole test binary.
    let status = spawn_child("truncate", dir.path()).wait().expect("wait");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            None,
            "the reader died of a signal (SIGBUS is 7): {status}"
        );
    }
    assert!(status.success(), "the reader failed: {status}");
}

#[test]
fn two_processes_warming_one_cache_leave_it_intact() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let spawn = |role: &str| spawn_child(role, dir.path());
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
/// --nocapture`. A 64³ phantom case, read cold (prepare, write) and warm (read and verify)
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
        "64^3 case: cold (load + quantise + write) {:.2} ms, warm hit (read + verify) {:.3} ms, 64^3 crop {:.2} ms, file {} bytes",
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

/// A volume of `shape` with CT-like intensities and about a fifth of its voxels labelled.
fn sized_volume(shape: [usize; 3]) -> CaseVolume {
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let image = (0..n).map(|_| rand::Rng::random::<f32>(&mut rng)).collect();
    let labels = (0..n).map(|i| if i % 5 == 0 { 1 << (i % 25) } else { 0 }).collect();
    CaseVolume::new("BDMAP_00000042".into(), shape, image, labels)
}

/// Figures for the report and the choice of checksum: `cargo test --release -p data --lib
/// section_checksum_cost -- --ignored --nocapture`. For a demo-sized and a SuPreM-sized case:
/// one verified read of the file (copy + xxh3 of every section) from a warm page cache, and the
/// checksum alone with xxh3, crc32 and sha256 over the same bytes.
#[test]
#[ignore]
fn section_checksum_cost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = config_digest(CONFIG);
    // Demo phantoms are 64^3 after preprocessing; an AbdomenAtlas CT resampled to 1.5 mm and
    // cropped to the body is about 256 x 224 x 224 (a 96^3 patch samples a fifth of it per axis).
    for (what, shape) in [("demo 64^3", [64, 64, 64]), ("SuPreM 256x224x224", [256, 224, 224])] {
        let vol = sized_volume(shape);
        let name = file_name(&vol.id, &digest);
        let path = write_case_file(dir.path(), &name, &vol, &digest).expect("write");
        let bytes = fs::metadata(&path).expect("meta").len() as f64;
        let time = |reps: usize, f: &mut dyn FnMut()| {
            f();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        };
        let reps = if shape[0] > 64 { 10 } else { 200 };
        let read = time(reps, &mut || {
            let v = read_verified(&path, &vol.id, &digest).expect("valid").expect("present");
            assert_eq!(v.shape, shape);
        });
        let plain = time(reps, &mut || {
            std::hint::black_box(fs::read(&path).expect("read"));
        });
        let data = fs::read(&path).expect("read");
        let data = &data[PAGE..];
        let xxh3 = time(reps, &mut || {
            std::hint::black_box(xxhash_rust::xxh3::xxh3_64(data));
        });
        let crc = time(reps, &mut || {
            std::hint::black_box(crc32fast::hash(data));
        });
        let sha = time(reps.div_ceil(4), &mut || {
            std::hint::black_box(Sha256::digest(data));
        });
        let rate = |s: f64| bytes / s / 1e6;
        eprintln!(
            "{what}: file {:.1} MB; verified read {:.2} ms ({:.0} MB/s); plain fs::read {:.2} ms ({:.0} MB/s); checksum alone: xxh3 {:.2} ms \
             ({:.0} MB/s), crc32fast {:.2} ms ({:.0} MB/s), sha256 {:.2} ms ({:.0} MB/s)",
            bytes / 1e6,
            read * 1e3,
            rate(read),
            plain * 1e3,
            rate(plain),
            xxh3 * 1e3,
            rate(xxh3),
            crc * 1e3,
            rate(crc),
            sha * 1e3,
            rate(sha)
        );
    }
}
