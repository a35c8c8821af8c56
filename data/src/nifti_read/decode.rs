//! Turning the bytes after the header into voxels of the type a caller wants, scaled as nibabel
//! scales them, in blocks as they come out of the decompressor: no intermediate copy of the raw
//! data, and no per-voxel allocation or ndarray machinery. The loops are monomorphised per
//! (datatype, byte order, scaled or not) so the compiler can vectorise each.

/// An element type a volume can be decoded into.
pub trait Voxel: Copy + Send + 'static {
    /// Converts a value already scaled by `scl_slope`/`scl_inter` (computed in f64 as nibabel's
    /// `get_fdata()` does).
    fn from_scaled(v: f64) -> Self;
}

impl Voxel for f32 {
    #[inline(always)]
    fn from_scaled(v: f64) -> Self {
        v as f32
    }
}

impl Voxel for f64 {
    #[inline(always)]
    fn from_scaled(v: f64) -> Self {
        v
    }
}

/// Masks: 1 where the scaled value is non-zero (NaN included, as numpy's `!= 0` has it), else 0,
/// written straight into bytes without an f32 copy of the mask.
impl Voxel for u8 {
    #[inline(always)]
    fn from_scaled(v: f64) -> Self {
        (v != 0.0) as u8
    }
}

trait Raw {
    const SIZE: usize;
    fn le(b: &[u8]) -> f64;
    fn be(b: &[u8]) -> f64;
}

macro_rules! raw {
    ($($t:ty),*) => {$(
        impl Raw for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn le(b: &[u8]) -> f64 {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a) as f64
            }
            #[inline(always)]
            fn be(b: &[u8]) -> f64 {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_be_bytes(a) as f64
            }
        }
    )*};
}
raw!(u8, i8, i16, u16, i32, u32, f32, f64);

use super::header::{Datatype, Endianness};

/// Appends the voxels of `bytes` (whole elements only; a trailing partial element is ignored,
/// callers pass aligned blocks) to `out`.
pub(super) fn convert<T: Voxel>(
    out: &mut Vec<T>,
    bytes: &[u8],
    datatype: Datatype,
    endianness: Endianness,
    scaling: Option<(f64, f64)>,
) {
    let big = endianness == Endianness::Big;
    match datatype {
        Datatype::U8 => convert_as::<u8, T>(out, bytes, big, scaling),
        Datatype::I8 => convert_as::<i8, T>(out, bytes, big, scaling),
        Datatype::I16 => convert_as::<i16, T>(out, bytes, big, scaling),
        Datatype::U16 => convert_as::<u16, T>(out, bytes, big, scaling),
        Datatype::I32 => convert_as::<i32, T>(out, bytes, big, scaling),
        Datatype::U32 => convert_as::<u32, T>(out, bytes, big, scaling),
        Datatype::F32 => convert_as::<f32, T>(out, bytes, big, scaling),
        Datatype::F64 => convert_as::<f64, T>(out, bytes, big, scaling),
    }
}

fn convert_as<R: Raw, T: Voxel>(out: &mut Vec<T>, bytes: &[u8], big: bool, scaling: Option<(f64, f64)>) {
    let chunks = bytes.chunks_exact(R::SIZE);
    match (big, scaling) {
        (false, None) => out.extend(chunks.map(|c| T::from_scaled(R::le(c)))),
        (true, None) => out.extend(chunks.map(|c| T::from_scaled(R::be(c)))),
        (false, Some((slope, inter))) => out.extend(chunks.map(|c| T::from_scaled(R::le(c) * slope + inter))),
        (true, Some((slope, inter))) => out.extend(chunks.map(|c| T::from_scaled(R::be(c) * slope + inter))),
    }
}
