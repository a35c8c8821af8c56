//! The gRPC framing of a ring link's `CollectiveChunk` messages, done here instead of in tonic's
//! codec so that a chunk's values are never copied in user space beyond the one pass that puts
//! them on the wire.
//!
//! tonic's codec encodes each message into its own buffer (a copy of the payload on the sending
//! side) and gathers the received HTTP/2 frames into another (a copy, and a regrowing buffer, on
//! the receiving side); perf put those copies and the page faults of the regrowth at about 40%
//! of a 4-rank all-reduce. Here a chunk travels as two HTTP/2 DATA frames, a small header (the
//! gRPC length prefix, the chunk's other fields and the `data` field's tag and length) and the
//! payload, which HTTP/2 writes with `writev` straight from the buffer the values were encoded
//! into, or, when a chunk is forwarded unchanged, from the very buffer it was received in. The
//! receiver splits the received frames into messages without copying, and `data` comes out as a
//! slice of the frame it arrived in, which the ring adds from directly.
//!
//! On the wire this is plain gRPC: a length-prefixed, uncompressed protobuf `CollectiveChunk`
//! per message (protobuf allows fields in any order, so `data` may come last). Generated clients
//! and servers of `Collective.Link` interoperate with it, and the tests use one.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use protocol::pb;

/// The method the ring's links call.
pub(crate) const LINK_PATH: &str = "/voxelfleet.v1.Collective/Link";

/// The gRPC message prefix: a compression flag byte and a big-endian u32 length.
const PREFIX_BYTES: usize = 5;

/// Field number of `CollectiveChunk.data`.
const DATA_FIELD: u32 = 6;

/// Largest message a link accepts: a chunk's values plus its header, with room to spare.
pub(crate) const MAX_MESSAGE_BYTES: usize = 2 * protocol::MAX_CHUNK_BYTES;

/// One chunk as it goes on the wire: header frame, then payload frame (empty for a hello).
pub(crate) struct Framed {
    pub(crate) header: Bytes,
    pub(crate) payload: Bytes,
}

impl Framed {
    /// `chunk`'s fields with `payload` as its `data` (whatever `chunk.data` holds is ignored).
    pub(crate) fn new(chunk: &pb::CollectiveChunk, payload: Bytes) -> Framed {
        let fields = pb::CollectiveChunk {
            data: Bytes::new(),
            run_id: chunk.run_id.clone(),
            ..*chunk
        };
        let data_key_and_len = if payload.is_empty() {
            0
        } else {
            prost::encoding::key_len(DATA_FIELD) + prost::encoding::encoded_len_varint(payload.len() as u64)
        };
        let message_len = fields.encoded_len() + data_key_and_len + payload.len();
        let mut header = BytesMut::with_capacity(PREFIX_BYTES + message_len - payload.len());
        put_prefix(&mut header, message_len);
        fields.encode(&mut header).expect("capacity reserved above");
        if !payload.is_empty() {
            prost::encoding::encode_key(DATA_FIELD, prost::encoding::WireType::LengthDelimited, &mut header);
            prost::encoding::encode_varint(payload.len() as u64, &mut header);
        }
        Framed {
            header: header.freeze(),
            payload,
        }
    }

    /// The frames to send, in order.
    pub(crate) fn frames(self) -> impl Iterator<Item = Bytes> {
        [self.header, self.payload].into_iter().filter(|b| !b.is_empty())
    }
}

/// The gRPC prefix of an uncompressed message of `message_len` bytes.
pub(crate) fn put_prefix(buf: &mut impl BufMut, message_len: usize) {
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message_len).expect("collective messages are far below 4 GiB"));
}

/// A gRPC message whose length prefix or content is not what a link accepts.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FramingError {
    #[error("collective link messages must not be compressed (flag {0})")]
    Compressed(u8),
    #[error("collective link message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge { len: usize },
    #[error("collective link message is no CollectiveChunk: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("collective link ended inside a message ({0} bytes left over)")]
    Truncated(usize),
}

/// Splits received HTTP/2 frames into `CollectiveChunk`s without copying them.
#[derive(Default)]
pub(crate) struct MessageReader {
    frames: Segments,
}

impl MessageReader {
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.frames.push(frame);
    }

    /// The next whole message, if its bytes have all arrived.
    pub(crate) fn next_chunk(&mut self) -> Result<Option<pb::CollectiveChunk>, FramingError> {
        if self.frames.remaining() < PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX_BYTES];
        self.frames.peek(&mut prefix);
        if prefix[0] != 0 {
            return Err(FramingError::Compressed(prefix[0]));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(FramingError::TooLarge { len });
        }
        if self.frames.remaining() < PREFIX_BYTES + len {
            return Ok(None);
        }
        self.frames.advance(PREFIX_BYTES);
        let mut message = self.frames.split_to(len);
        Ok(Some(pb::CollectiveChunk::decode(&mut message)?))
    }

    /// Checks that the stream did not stop in the middle of a message.
    pub(crate) fn finish(&self) -> Result<(), FramingError> {
        match self.frames.remaining() {
            0 => Ok(()),
            left => Err(FramingError::Truncated(left)),
        }
    }
}

/// A byte sequence held as the frames it arrived in. As a [`Buf`], its `copy_to_bytes` returns
/// a slice of the front frame when the bytes asked for lie in it (prost takes a `bytes` field
/// that way), and copies only when they straddle frames.
#[derive(Default)]
struct Segments {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Segments {
    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push_back(part);
        }
    }

    /// Copies the first `out.len()` bytes into `out` without consuming them.
    fn peek(&self, out: &mut [u8]) {
        let mut filled = 0;
        for part in &self.parts {
            let n = (out.len() - filled).min(part.len());
            out[filled..filled + n].copy_from_slice(&part[..n]);
            filled += n;
            if filled == out.len() {
                break;
            }
        }
    }

    /// Takes the first `len` bytes off as their own `Segments`, sharing the frames' memory.
    fn split_to(&mut self, len: usize) -> Segments {
        let mut taken = Segments::default();
        while taken.len < len {
            let part = self.parts.front_mut().expect("caller checked the length");
            let want = len - taken.len;
            if part.len() <= want {
                let whole = self.parts.pop_front().expect("front exists");
                self.len -= whole.len();
                taken.push(whole);
            } else {
                self.len -= want;
                taken.push(part.split_to(want));
            }
        }
        taken
    }
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |p| &p[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of the received frames");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("length checked above");
            if front.len() > cnt {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                self.len -= len;
                let taken = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                taken
            }
            _ => {
                assert!(len <= self.len, "copy_to_bytes past the end of the received frames");
                let mut out = BytesMut::with_capacity(len);
                out.put(self.take(len));
                out.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(payload: usize) -> (pb::CollectiveChunk, Bytes) {
        let data = Bytes::from((0..payload).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>());
        let chunk = pb::CollectiveChunk {
            run_id: "run-7".into(),
            from_rank: 3,
            op: 9,
            ring_step: 2,
            offset: 1 << 40,
            data: data.clone(),
            hello: payload == 0,
            generation: 5,
            bucket: 11,
        };
        (chunk, data)
    }

    #[test]
    fn framed_chunks_are_standard_grpc_messages() {
        for payload in [0, 1, 1000, 70_000] {
            let (expected, data) = chunk(payload);
            let framed = Framed::new(&expected, data);
            let wire: Vec<u8> = framed.frames().flat_map(|b| b.to_vec()).collect();
            assert_eq!(wire[0], 0);
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, wire.len() - 5);
            // Any protobuf decoder reads it: prost's, from one contiguous buffer.
            assert_eq!(pb::CollectiveChunk::decode(&wire[5..]).unwrap(), expected);
        }
    }

    #[test]
    fn messages_split_anywhere_decode_and_payloads_in_one_frame_are_not_copied() {
        let (first, d1) = chunk(5000);
        let (second, d2) = chunk(0);
        let (third, d3) = chunk(12_345);
        let framed: Vec<Bytes> = [(&first, d1), (&second, d2), (&third, d3)]
            .into_iter()
            .flat_map(|(c, d)| Framed::new(c, d).frames())
            .collect();
        // As sent: every payload arrives as its own frame and comes out as a slice of it.
        let mut reader = MessageReader::default();
        framed.iter().cloned().for_each(|f| reader.push(f));
        let got = reader.next_chunk().unwrap().unwrap();
        assert_eq!(got, first);
        assert_eq!(got.data.as_ptr(), framed[1].as_ptr(), "the payload was copied");
        assert_eq!(reader.next_chunk().unwrap().unwrap(), second);
        assert_eq!(reader.next_chunk().unwrap().unwrap(), third);
        assert!(reader.next_chunk().unwrap().is_none());
        reader.finish().unwrap();

        // Re-cut into arbitrary pieces, fed one at a time.
        let wire: Vec<u8> = framed.iter().flat_map(|b| b.to_vec()).collect();
        for piece in [1, 3, 4096, 7919] {
            let mut reader = MessageReader::default();
            let mut got = vec![];
            for part in wire.chunks(piece) {
                reader.push(Bytes::copy_from_slice(part));
                while let Some(c) = reader.next_chunk().unwrap() {
                    got.push(c);
                }
            }
            reader.finish().unwrap();
            assert_eq!(
                got,
                vec![first.clone(), second.clone(), third.clone()],
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn bad_prefixes_and_truncated_streams_are_errors() {
        let mut reader = MessageReader::default();
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert!(matches!(reader.next_chunk(), Err(FramingError::Compressed(1))));

        let mut reader = MessageReader::default();
        reader.push(Bytes::from_static(&[0, 0xff, 0, 0, 0]));
        let err = reader.next_chunk().unwrap_err().to_string();
        assert!(err.contains("exceeds the limit"), "{err}");

        let mut reader = MessageReader::default();
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 9, 1, 2]));
        assert!(reader.next_chunk().unwrap().is_none());
        assert!(matches!(reader.finish(), Err(FramingError::Truncated(7))));
    }
}
