use super::*;
use crate::backend::Cpu;
use crate::collective::serve_loopback_ring;
use burn::tensor::module::conv3d;
use burn::tensor::ops::ConvOptions;
use std::time::Duration;

/// A volume of `shape` whose image is a smooth ramp and whose labels put class `c` on the voxels
/// where a per-class pattern holds, so classes differ in size and some are absent.
fn volume(id: &str, shape: [usize; 3], seed: usize) -> CaseVolume {
    let [d, h, w] = shape;
    let mut image = Vec::with_capacity(d * h * w);
    let mut labels = Vec::with_capacity(d * h * w);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                let v = ((z * 7 + y * 3 + x * 5 + seed * 11) % 23) as f32 / 22.0;
                image.push(v);
                let mut bits = 0u32;
                for c in 0..6 {
                    if (z + 2 * y + x + c + seed).is_multiple_of(c + 2) {
                        bits |= 1 << c;
                    }
                }
                labels.push(bits);
            }
        }
    }
    CaseVolume::new(id.into(), shape, image, labels)
}

fn volumes() -> Vec<CaseVolume> {
    [[13, 17, 11], [9, 20, 14], [16, 16, 16], [5, 7, 30], [21, 10, 9]]
        .iter()
        .enumerate()
        .map(|(i, &shape)| volume(&format!("case{i}"), shape, i))
        .collect()
}

/// A fixed 3x3x3 conv to every class: its output depends on window borders, like a real model's.
fn conv_predictor() -> impl FnMut(Tensor<Cpu, 5>) -> Tensor<Cpu, 5> {
    let n = NUM_CLASSES * 27;
    let weights: Vec<f32> = (0..n).map(|i| ((i * 29 % 31) as f32 - 15.0) / 40.0).collect();
    let bias: Vec<f32> = (0..NUM_CLASSES).map(|c| (c as f32 - 12.0) / 10.0).collect();
    let device = Default::default();
    let weight = Tensor::<Cpu, 5>::from_data(TensorData::new(weights, [NUM_CLASSES, 1, 3, 3, 3]), &device);
    let bias = Tensor::<Cpu, 1>::from_data(TensorData::new(bias, [NUM_CLASSES]), &device);
    move |x| {
        conv3d(
            x,
            weight.clone(),
            Some(bias.clone()),
            ConvOptions::new([1; 3], [1; 3], [1; 3], 1),
        )
    }
}

fn window() -> SlidingWindow {
    SlidingWindow {
        sw_batch_size: 2,
        ..SlidingWindow::new([8, 8, 8])
    }
}

#[test]
fn counts_match_a_voxel_by_voxel_count() {
    // Predicts every class where the intensity exceeds 0.5: a pointwise rule, so the expected
    // counts follow from the volume alone.
    let predict = |x: Tensor<Cpu, 5>| (x * 2.0 - 1.0).repeat_dim(1, NUM_CLASSES);
    let vols = volumes();
    let refs: Vec<&CaseVolume> = vols.iter().collect();
    let counts = evaluate(predict, &refs, &window(), &Default::default()).unwrap();

    let mut expected = DiceCounts::default();
    for vol in &vols {
        let (image, labels, _) = whole_volume(vol, 1);
        let plane = image.len();
        for (c, total) in expected.per_class.iter_mut().enumerate() {
            for (i, &v) in image.iter().enumerate() {
                let (pred, target) = (v > 0.5, labels[c * plane + i] > 0.5);
                total[0] += (pred && target) as u64;
                total[1] += pred as u64;
                total[2] += target as u64;
            }
        }
        expected.cases += 1;
    }
    assert_eq!(counts, expected);
    assert!(expected.per_class[0][0] > 0 && expected.per_class[5][2] > 0);
    let report = EvalReport::from_counts(counts);
    assert_eq!(report.cases, 5);
    let [i, p, t] = expected.per_class[1];
    assert_eq!(report.per_class[1], Some(2.0 * i as f64 / (p + t) as f64));
    assert_eq!(report.per_class[6], None, "class 6 is in no case");
}

#[test]
fn shards_take_every_world_th_case_from_the_rank() {
    let ids: Vec<u32> = (0..7).collect();
    let take = |rank, world| shard(&ids, rank, world).copied().collect::<Vec<_>>();
    assert_eq!(take(0, 3), [0, 3, 6]);
    assert_eq!(take(2, 3), [2, 5]);
    assert_eq!(take(0, 1), ids);
    assert_eq!(take(8, 9), Vec::<u32>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_sharing_the_cases_report_exactly_what_one_rank_does() {
    let vols = volumes();
    let all: Vec<&CaseVolume> = vols.iter().collect();
    let device = Default::default();
    let alone = evaluate(conv_predictor(), &all, &window(), &device).unwrap();

    let token = protocol::auth::SharedToken::new("eval-shard-test-token-0123456789").unwrap();
    let (hubs, peers) = serve_loopback_ring(2, &token).await.unwrap();
    let mut tasks = vec![];
    for (rank, hub) in hubs.iter().enumerate() {
        let mine: Vec<&CaseVolume> = shard(&all, rank as u32, 2).copied().collect();
        let counts = evaluate(conv_predictor(), &mine, &window(), &device).unwrap();
        assert_ne!(counts, alone, "rank {rank}'s share alone is not the whole");
        assert_eq!(counts.cases, [3, 2][rank]);
        let mut ring = Ring::connect(hub, "run-eval", rank as u32, &peers, Duration::from_secs(20))
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut counts = counts;
            counts.sum_over_ranks(&mut ring).await.unwrap();
            counts
        }));
    }
    for task in tasks {
        let summed = task.await.unwrap();
        assert_eq!(summed, alone);
        assert_eq!(EvalReport::from_counts(summed), EvalReport::from_counts(alone.clone()));
    }
}
