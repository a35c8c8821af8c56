//! What a chunk's bytes hold: little-endian f32 values, or bfloat16 ones when the ring sends
//! bf16. Encoding is one pass over the slice into a fresh `Bytes` (a plain memcpy for f32), and
//! decoding adds or copies straight from the received buffer into the caller's values: no
//! intermediate vector in either direction.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

/// How a ring's f32 values travel. The sum is always accumulated in f32; bf16 halves the bytes
/// on the wire at the cost of rounding each partial sum (see [`super::Ring`] for the bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireFormat {
    #[default]
    F32,
    Bf16,
}

// The f32 path reinterprets memory as little-endian bytes.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "the collective wire assumes a little-endian host"
);

impl WireFormat {
    pub fn bytes_per_value(self) -> usize {
        match self {
            WireFormat::F32 => 4,
            WireFormat::Bf16 => 2,
        }
    }

    /// Values a chunk of `bytes` bytes holds, if it is a whole number of them.
    pub(crate) fn values_in(self, bytes: usize) -> Option<usize> {
        let per = self.bytes_per_value();
        bytes.is_multiple_of(per).then_some(bytes / per)
    }
}

/// `values` as they travel, written into `buf` (emptied first).
pub(crate) fn encode_into(values: &[f32], wire: WireFormat, buf: &mut BytesMut) {
    buf.clear();
    buf.reserve(values.len() * wire.bytes_per_value());
    append_encoded(values, wire, buf);
}

fn append_encoded(values: &[f32], wire: WireFormat, buf: &mut BytesMut) {
    match wire {
        WireFormat::F32 => buf.extend_from_slice(bytemuck::cast_slice(values)),
        WireFormat::Bf16 => values
            .iter()
            .for_each(|v| buf.put_u16_le(half::bf16::from_f32(*v).to_bits())),
    }
}

/// Values per block of [`add_encode`]: 16 KiB of f32, which stay in L1 between the add and the
/// encode.
const FUSED_BLOCK_VALUES: usize = 4096;

/// Encodes `local[i] + decoded[i]` into `buf` (emptied first): a partial sum passed on around
/// the ring goes to the wire block by block, without a store into `local` and a second pass to
/// read it back. With `keep`, `local` also gets the sum as it will decode on the other ranks
/// (the owner of a block's sum keeps exactly what it sends). The caller has checked the lengths.
pub(crate) fn add_encode(local: &mut [f32], bytes: &[u8], wire: WireFormat, buf: &mut BytesMut, keep: bool) {
    buf.clear();
    buf.reserve(local.len() * wire.bytes_per_value());
    let mut block = [0f32; FUSED_BLOCK_VALUES];
    let received = bytes.chunks(FUSED_BLOCK_VALUES * wire.bytes_per_value());
    for (mine, theirs) in local.chunks_mut(FUSED_BLOCK_VALUES).zip(received) {
        let sum = &mut block[..mine.len()];
        sum.copy_from_slice(mine);
        add_into(sum, theirs, wire);
        append_encoded(sum, wire, buf);
        if keep {
            round_trip(sum, wire);
            mine.copy_from_slice(sum);
        }
    }
}

/// `values` as they travel, in a buffer of their own.
#[cfg(test)]
pub(crate) fn encode(values: &[f32], wire: WireFormat) -> Bytes {
    let mut buf = BytesMut::new();
    encode_into(values, wire, &mut buf);
    buf.freeze()
}

/// Buffers a ring encodes its chunks into, taken back once HTTP/2 has written them. A chunk is
/// up to 1 MiB: the allocator hands a fresh one out as newly mapped memory, and faulting it in
/// (zeroing a huge page) cost more than the encode itself in perf of a 4-rank all-reduce.
#[derive(Default)]
pub(crate) struct SendBuffers {
    /// Buffers handed out, oldest first; one is free again once only this list holds it.
    lent: VecDeque<Bytes>,
}

/// Buffers [`SendBuffers`] tracks; more in flight than this are allocated and forgotten.
const TRACKED_SEND_BUFFERS: usize = 64;

impl SendBuffers {
    /// An empty buffer: the oldest lent one if it is free, else a new one.
    pub(crate) fn take(&mut self) -> BytesMut {
        if self.lent.front().is_some_and(Bytes::is_unique) {
            let oldest = self.lent.pop_front().expect("checked non-empty");
            if let Ok(mut buf) = oldest.try_into_mut() {
                buf.clear();
                return buf;
            }
        }
        BytesMut::new()
    }

    /// Freezes `buf` for sending and remembers it, to take it back when it is free.
    pub(crate) fn lend(&mut self, buf: BytesMut) -> Bytes {
        let bytes = buf.freeze();
        if self.lent.len() < TRACKED_SEND_BUFFERS {
            self.lent.push_back(bytes.clone());
        }
        bytes
    }
}

/// Rounds `values` to what they become after a trip through `wire`, so the rank that owns a sum
/// keeps exactly the bits it sends to everyone else.
pub(crate) fn round_trip(values: &mut [f32], wire: WireFormat) {
    if wire == WireFormat::Bf16 {
        values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    }
}

/// `dst[i] += decoded[i]`. The caller has checked the lengths agree.
pub(crate) fn add_into(dst: &mut [f32], bytes: &[u8], wire: WireFormat) {
    match wire {
        WireFormat::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(values) => dst.iter_mut().zip(values).for_each(|(x, v)| *x += v),
            // The receive buffer need not be 4-aligned: read each value unaligned.
            Err(_) => dst
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(x, b)| *x += f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        },
        WireFormat::Bf16 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(x, b)| *x += bf16_to_f32([b[0], b[1]])),
    }
}

/// `dst[i] = decoded[i]`. The caller has checked the lengths agree.
pub(crate) fn copy_into(dst: &mut [f32], bytes: &[u8], wire: WireFormat) {
    match wire {
        WireFormat::F32 => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(bytes),
        WireFormat::Bf16 => dst
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(x, b)| *x = bf16_to_f32([b[0], b[1]])),
    }
}

fn bf16_to_f32(le: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(le) as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_bit_for_bit_even_from_an_unaligned_buffer() {
        let values = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e38, -7.25];
        let bytes = encode(&values, WireFormat::F32);
        let mut unaligned = vec![0u8];
        unaligned.extend_from_slice(&bytes);
        let mut copied = [0f32; 5];
        copy_into(&mut copied, &unaligned[1..], WireFormat::F32);
        let mut added = [1f32; 5];
        add_into(&mut added, &unaligned[1..], WireFormat::F32);
        for i in 0..5 {
            assert_eq!(copied[i].to_bits(), values[i].to_bits());
            assert_eq!(added[i].to_bits(), (1.0 + values[i]).to_bits());
        }
    }

    #[test]
    fn add_encode_sends_the_sum_and_the_owner_keeps_what_it_sends() {
        let n = 3 * FUSED_BLOCK_VALUES + 17;
        let mine: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let theirs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        for wire in [WireFormat::F32, WireFormat::Bf16] {
            let received = encode(&theirs, wire);
            let mut expected = mine.clone();
            add_into(&mut expected, &received, wire);
            let sent = encode(&expected, wire);
            for keep in [false, true] {
                let mut local = mine.clone();
                let mut buf = BytesMut::new();
                add_encode(&mut local, &received, wire, &mut buf, keep);
                assert_eq!(&buf[..], &sent[..], "{wire:?}");
                let mut decoded = vec![0f32; n];
                copy_into(&mut decoded, &sent, wire);
                let kept = if keep { &decoded } else { &mine };
                assert_eq!(
                    local.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    kept.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn bf16_decodes_to_what_the_owner_keeps() {
        let values = [1.0f32 + 1.0 / 512.0, 2.71, -2.0e-3, 65_504.0];
        let bytes = encode(&values, WireFormat::Bf16);
        assert_eq!(bytes.len(), 8);
        let mut kept = values;
        round_trip(&mut kept, WireFormat::Bf16);
        let mut decoded = [0f32; 4];
        copy_into(&mut decoded, &bytes, WireFormat::Bf16);
        assert_eq!(kept.map(f32::to_bits), decoded.map(f32::to_bits));
        assert_ne!(kept[1], values[1], "bf16 keeps 8 significant bits only");
        assert!(((kept[1] - values[1]) / values[1]).abs() <= 1.0 / 256.0);
    }
}
