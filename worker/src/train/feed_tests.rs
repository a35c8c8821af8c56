use std::collections::HashSet;
use std::sync::atomic::AtomicUsize;

use data::cache::{Prepared, Source, VolumeCache};

use super::*;

const CASES: usize = 5;

fn ids() -> Vec<String> {
    (1..=CASES).map(|i| format!("BDMAP_{i:08}")).collect()
}

/// A small deterministic phantom per case id.
fn prepare(case_id: &str) -> Prepared {
    let seed = case_id
        .bytes()
        .fold(11u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    let n = 16 * 16 * 16;
    let image = (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 997) as f32 / 996.0)
        .collect();
    let labels = (0..n)
        .map(|i| {
            if (i as u32 ^ seed).is_multiple_of(7) {
                1 << ((i as u32 + seed) % 25)
            } else {
                0
            }
        })
        .collect();
    ([16, 16, 16], image, labels)
}

struct Phantoms {
    cache: VolumeCache,
    failing: HashSet<String>,
    panicking: bool,
    reads: AtomicUsize,
}

impl Phantoms {
    fn new(cache: VolumeCache) -> Self {
        Phantoms {
            cache,
            failing: HashSet::new(),
            panicking: false,
            reads: AtomicUsize::new(0),
        }
    }
}

impl CaseSource for Phantoms {
    fn volume(&self, case_id: &str) -> Result<(Arc<CaseVolume>, Source), DataError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        assert!(!self.panicking, "a bug in a loader");
        if self.failing.contains(case_id) {
            return Err(DataError::Corrupt {
                key: format!("{case_id}/ct.nii.gz"),
                reason: "truncated gzip".into(),
            });
        }
        self.cache.get_or_prepare(case_id, "feed test", || Ok(prepare(case_id)))
    }
}

fn config(first_consumed: u64, batches: u64) -> FeedConfig {
    FeedConfig {
        seed: 17,
        rank: 1,
        per_rank_batch: 2,
        samples_per_step: 4,
        first_consumed,
        batches,
        crop: CropConfig::suprem([8, 8, 8]),
        threads: 3,
        max_ahead_bytes: 64 << 20,
        max_substitutions: 4,
    }
}

fn builder(source: Arc<dyn CaseSource>, cfg: FeedConfig, substitute: bool) -> BatchBuilder {
    let order = Arc::new(SampleOrder::new(ids(), cfg.seed));
    let substitute = substitute.then(|| {
        let order = order.clone();
        Arc::new(move |index, attempt| Some(order.substitute(index, attempt).to_string())) as Substitute
    });
    BatchBuilder {
        order,
        source,
        substitute,
        config: cfg,
    }
}

fn drain(feed: &mut Feed) -> Vec<Batch> {
    std::iter::from_fn(|| feed.next_batch())
        .map(|b| b.expect("batch"))
        .collect()
}

#[test]
fn a_resumed_cursor_draws_the_same_cases_and_crops_cold_warm_prefetched_or_direct() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold = Arc::new(Phantoms::new(VolumeCache::new(dir.path(), 1 << 30, 2).expect("cache")));
    let mut feed = Feed::start(builder(cold, config(0, 8), false));
    let whole = drain(&mut feed);
    assert!(feed.next_batch().is_none());
    let metrics = feed.take_metrics();
    assert!(metrics.cache_hit_rate < 1.0, "a cold cache misses");
    assert_eq!(whole.len(), 8);
    let order = SampleOrder::new(ids(), 17);
    for (k, batch) in whole.iter().enumerate() {
        // Rank 1 of 2, batch 2: samples 4k+2, 4k+3.
        assert_eq!(batch.samples, 4 * k as u64 + 2..4 * k as u64 + 4);
        assert_eq!(batch.cases, order.cases(batch.samples.clone()));
        assert_eq!(batch.images.len(), 2 * 512);
        assert_eq!(batch.labels.len(), 2 * NUM_CLASSES * 512);
    }

    // Resumed after 3 steps, in a new process's view of the now warm cache.
    let warm = Arc::new(Phantoms::new(VolumeCache::new(dir.path(), 1 << 30, 2).expect("cache")));
    let mut resumed = Feed::start(builder(warm, config(12, 5), false));
    let tail = drain(&mut resumed);
    assert_eq!(resumed.take_metrics().cache_hit_rate, 1.0, "a warm cache only hits");
    for (a, b) in whole[3..].iter().zip(&tail) {
        assert_eq!((&a.samples, &a.cases), (&b.samples, &b.cases));
        assert!(a.images == b.images && a.labels == b.labels, "samples {:?}", a.samples);
    }

    // Built directly, without threads or a disk cache: the same bytes.
    let direct = builder(Arc::new(Phantoms::new(VolumeCache::disabled(1))), config(0, 8), false);
    for (k, batch) in whole.iter().enumerate() {
        let d = direct.build(k as u64).expect("direct");
        assert!(d.images == batch.images && d.labels == batch.labels, "batch {k}");
    }
}

#[test]
fn a_failed_case_is_substituted_deterministically_and_reported_in_order() {
    let run = || {
        let mut source = Phantoms::new(VolumeCache::disabled(2));
        source.failing.insert("BDMAP_00000003".into());
        let mut feed = Feed::start(builder(Arc::new(source), config(0, 10), true));
        drain(&mut feed)
    };
    let (a, b) = (run(), run());
    let order = SampleOrder::new(ids(), 17);
    let mut reported = vec![];
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.cases, y.cases);
        assert!(x.images == y.images && x.labels == y.labels);
        assert!(!x.cases.iter().any(|c| c == "BDMAP_00000003"));
        let own = order.cases(x.samples.clone());
        let indices: Vec<u64> = x.failures.iter().map(|f| f.sample_index).collect();
        assert!(indices.is_sorted(), "failures in sample order: {indices:?}");
        for (index, case) in x.samples.clone().zip(&own) {
            if *case == "BDMAP_00000003" {
                let f = x.failures.iter().find(|f| f.sample_index == index).expect("reported");
                assert_eq!(f.case_id, "BDMAP_00000003");
                assert!(f.error.to_string().contains("truncated gzip"));
                reported.push(index);
            }
        }
    }
    assert!(!reported.is_empty(), "the bad case was drawn");

    // Without substitutes, the batch holding it fails, naming the sample and the case.
    let mut source = Phantoms::new(VolumeCache::disabled(2));
    source.failing.insert("BDMAP_00000003".into());
    let mut feed = Feed::start(builder(Arc::new(source), config(0, 10), false));
    let failure = std::iter::from_fn(|| feed.next_batch())
        .find_map(Result::err)
        .expect("a failed batch");
    assert_eq!(failure.sample_index, reported[0]);
    assert_eq!(failure.case_id, "BDMAP_00000003");
}

#[test]
fn when_the_substitutes_run_out_too_the_failure_counts_the_bad_cases_and_names_them() {
    let mut source = Phantoms::new(VolumeCache::disabled(2));
    // Four of five cases are bad: a sample's substitutes soon run out.
    for id in &ids()[1..] {
        source.failing.insert(id.clone());
    }
    let mut feed = Feed::start(builder(Arc::new(source), config(0, 10), true));
    let failure = std::iter::from_fn(|| feed.next_batch())
        .find_map(Result::err)
        .expect("a failed batch");
    let message = failure.exhausted_message().expect("the substitutes ran out");
    let ex = failure.exhausted.as_ref().unwrap();
    assert_eq!(ex.substitutes.len(), 4, "max_substitutions are tried");
    assert_eq!(ex.run_cases, CASES);
    let distinct: HashSet<&String> = std::iter::once(&failure.case_id).chain(&ex.substitutes).collect();
    assert!(
        message.contains(&format!("{} of the run's {CASES} training cases", distinct.len())),
        "{message}"
    );
    assert!(message.contains("substitutes"), "{message}");
    for id in &distinct {
        assert!(message.contains(id.as_str()), "{id} not named: {message}");
    }
    assert!(message.contains("truncated gzip"), "the first error is kept: {message}");
}

#[test]
fn the_feed_builds_a_bounded_number_of_batches_ahead() {
    let source = Arc::new(Phantoms::new(VolumeCache::disabled(2)));
    let mut cfg = config(0, 20);
    cfg.max_ahead_bytes = 2 * cfg.batch_bytes();
    assert_eq!(cfg.depth(), 2);
    let mut feed = Feed::start(builder(source.clone(), cfg, false));
    let reads = || source.reads.load(Ordering::SeqCst);
    // Wait for the feed to fill up, then give it time to overshoot: it must not.
    let full = |feed: &Feed, want_reads| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while feed.buffered() < 2 || reads() < want_reads {
            assert!(
                std::time::Instant::now() < deadline,
                "the feed never filled: {}",
                feed.buffered()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    full(&feed, 4);
    assert_eq!(feed.buffered(), 2);
    assert_eq!(reads(), 4, "two batches of two samples");
    feed.next_batch().expect("one").expect("ok");
    full(&feed, 6);
    assert_eq!(feed.buffered(), 2);
    assert_eq!(reads(), 6);
    drop(feed);
}

#[test]
fn a_panicking_loader_fails_the_batch_instead_of_hanging() {
    let mut source = Phantoms::new(VolumeCache::disabled(1));
    source.panicking = true;
    let mut feed = Feed::start(builder(Arc::new(source), config(0, 2), false));
    let failure = feed.next_batch().expect("a batch").expect_err("an error");
    assert!(
        failure.error.to_string().contains("a bug in a loader"),
        "{}",
        failure.error
    );
}

#[test]
fn substitutes_are_seeded_picks() {
    let order = SampleOrder::new(ids(), 3);
    assert_eq!(order.substitute(9, 0), order.substitute(9, 0));
    let picks: HashSet<&str> = (0..100).map(|i| order.substitute(i, 0)).collect();
    assert_eq!(picks.len(), CASES, "every case can stand in");
}
