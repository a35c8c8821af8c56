//! How a flat buffer is cut for the ring: into buckets (at parameter boundaries, so the trainer
//! can hand over a bucket as soon as its parameters are flattened) and, across the whole buffer,
//! into fixed blocks that each start their reduction at one rank.
//!
//! The element at global index `i` lies in block `i / BLOCK_VALUES`, whose partial sum starts at
//! rank `block % W` and travels the ring from there. That depends only on `i` and the world size,
//! never on where buckets are cut or how many streams carry the chunks, so the order in which
//! each element is summed (and so its bits) is the same whatever the bucket size.

use std::ops::Range;

/// Values per ownership block, and the largest chunk on the wire (1 MiB of f32).
pub const BLOCK_VALUES: usize = protocol::MAX_CHUNK_BYTES / 4;

/// Cuts a buffer laid out as consecutive tensors of `param_lens` values into buckets of about
/// `bucket_bytes` each, cutting only between tensors (a tensor larger than a bucket is a bucket
/// of its own). A pure function of the layout, so every rank cuts the same way. The buckets
/// cover `0..sum(param_lens)` in order; an empty layout gives no bucket.
pub fn bucket_bounds(param_lens: &[usize], bucket_bytes: usize) -> Vec<Range<usize>> {
    let target = (bucket_bytes / 4).max(1);
    let mut bounds = vec![];
    let (mut start, mut end) = (0, 0);
    for &len in param_lens {
        if end > start && end - start + len > target {
            bounds.push(start..end);
            start = end;
        }
        end += len;
    }
    if end > start {
        bounds.push(start..end);
    }
    bounds
}

/// Buckets of `n` values with no layout to respect: pieces of about `bucket_bytes`.
pub fn uniform_buckets(n: usize, bucket_bytes: usize) -> Vec<Range<usize>> {
    let target = (bucket_bytes / 4).max(1);
    (0..n.div_ceil(target))
        .map(|b| b * target..((b + 1) * target).min(n))
        .collect()
}

/// The chunks of `bucket`: its intersections with the ownership blocks, in order.
pub(crate) fn pieces(bucket: &Range<usize>) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut at = bucket.start;
    std::iter::from_fn(move || {
        (at < bucket.end).then(|| {
            let end = ((at / BLOCK_VALUES + 1) * BLOCK_VALUES).min(bucket.end);
            let piece = at..end;
            at = end;
            piece
        })
    })
}

/// The rank that starts the partial sum of the block holding element `offset`.
pub(crate) fn start_rank(offset: usize, world: u32) -> u32 {
    ((offset / BLOCK_VALUES) % world as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cut_between_tensors_and_cover_the_buffer() {
        // 4-byte values: a 40-byte bucket holds 10 values.
        let bounds = bucket_bounds(&[3, 4, 5, 20, 1, 1], 40);
        assert_eq!(bounds, vec![0..7, 7..12, 12..32, 32..34]);
        assert_eq!(bucket_bounds(&[], 40), Vec::<Range<usize>>::new());
        assert_eq!(bucket_bounds(&[0, 5, 0], 4), vec![0..5]);
    }

    #[test]
    fn pieces_follow_the_global_blocks() {
        let bucket = BLOCK_VALUES - 3..2 * BLOCK_VALUES + 5;
        let got: Vec<_> = pieces(&bucket).collect();
        assert_eq!(
            got,
            vec![
                BLOCK_VALUES - 3..BLOCK_VALUES,
                BLOCK_VALUES..2 * BLOCK_VALUES,
                2 * BLOCK_VALUES..2 * BLOCK_VALUES + 5
            ]
        );
        assert_eq!(start_rank(BLOCK_VALUES * 7 + 1, 3), 1);
        assert_eq!(uniform_buckets(10, 16), vec![0..4, 4..8, 8..10]);
    }
}
