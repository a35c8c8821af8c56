//! One preprocessed CT case, compact, in the layout the model consumes: the windowed image
//! quantised to u16, the per-voxel class bitmask, and the foreground indices, either owned or
//! in a page-aligned copy of a verified file of the node-wide cache (`crate::cache`).
//!
//! Layout: shape is `[D, H, W]` = `[z, y, x]` and the flat index of voxel `(z, y, x)` is
//! `(z * H + y) * W + x` (x fastest). That is exactly burn's `[N, C, D, H, W]` with the batch and
//! channel axes dropped, so crops copy contiguous x-runs straight into tensor buffers. It is also
//! NIfTI's on-disk (Fortran, x fastest) order, so decoding needs no transposition.
//!
//! Why u16 and not u8: the window maps −175..250 HU onto 0..1, so one HU is 1/425; u8's step of
//! 1/255 is coarser than that (1.7 HU), u16's 1/65535 is 0.0065 HU, far below CT noise and below
//! what trilinear resampling produces between integer HU. u16 halves f32's bytes, and since every
//! path (cached or not) quantises the same way, a cold and a warm cache give bit-identical crops.

use std::sync::Arc;

use memmap2::Mmap;
use protocol::classes::NUM_CLASSES;

// A u32 bitmask holds every class of a voxel; widening it is a one-line change if the class list
// ever outgrows it, and this makes that change impossible to forget.
const _: () = assert!(NUM_CLASSES <= 32, "labels are a u32 bitmask per voxel");

/// The largest quantised intensity: windowed 1.0.
pub const QUANT_MAX: u16 = u16::MAX;

/// SuPreM's intensity preprocessing: clip Hounsfield units to −175..250 and scale to 0..1.
pub fn window_hu(hu: f32) -> f32 {
    ((hu + 175.0) / 425.0).clamp(0.0, 1.0)
}

/// Windowed 0..1 intensity to its stored u16 (NaN stores as 0, like air).
pub fn quantise(x: f32) -> u16 {
    (x.clamp(0.0, 1.0) * QUANT_MAX as f32).round() as u16
}

/// Stored u16 back to a 0..1 intensity.
pub fn dequantise(q: u16) -> f32 {
    q as f32 / QUANT_MAX as f32
}

/// Byte ranges of the three arrays inside a cache file's in-memory copy; the cache checked them
/// (bounds, alignment, checksums) before building the volume.
#[derive(Debug, Clone)]
pub(crate) struct MappedSections {
    pub image: std::ops::Range<usize>,
    pub labels: std::ops::Range<usize>,
    pub foreground: std::ops::Range<usize>,
}

#[derive(Debug)]
enum Buffers {
    Owned {
        image: Vec<u16>,
        labels: Vec<u32>,
        foreground: Vec<u32>,
    },
    /// Shared so a volume can be cloned cheaply (the cache's in-process LRU and a crop in flight
    /// may both hold it); the mapping goes away with the last holder.
    Mapped { map: Arc<Mmap>, sections: MappedSections },
}

/// A case ready for cropping. Nothing in it is f32: intensities are dequantised per crop.
#[derive(Debug)]
pub struct CaseVolume {
    /// The case folder name, e.g. `BDMAP_00000001`.
    pub id: String,
    /// `[D, H, W]` = `[z, y, x]`.
    pub shape: [usize; 3],
    buffers: Buffers,
}

impl PartialEq for CaseVolume {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.shape == other.shape
            && self.image() == other.image()
            && self.labels() == other.labels()
            && self.foreground() == other.foreground()
    }
}

/// Flat indices of labelled voxels, ascending.
pub(crate) fn foreground_of(labels: &[u32]) -> Vec<u32> {
    labels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != 0)
        .map(|(i, _)| i as u32)
        .collect()
}

impl CaseVolume {
    /// Builds a volume from windowed 0..1 intensities and bitmask labels, quantising the image and
    /// deriving `foreground`.
    ///
    /// Panics only on a programming error (buffer lengths that disagree with `shape`); the
    /// loader checks shapes against the files before calling this.
    pub fn new(id: String, shape: [usize; 3], image: Vec<f32>, labels: Vec<u32>) -> Self {
        let image = image.into_iter().map(quantise).collect();
        Self::from_quantised(id, shape, image, labels)
    }

    /// Builds a volume from an already quantised image.
    pub fn from_quantised(id: String, shape: [usize; 3], image: Vec<u16>, labels: Vec<u32>) -> Self {
        let n = shape.iter().product::<usize>();
        assert_eq!(image.len(), n, "image length does not match shape {shape:?}");
        assert_eq!(labels.len(), n, "labels length does not match shape {shape:?}");
        assert!(
            n <= u32::MAX as usize,
            "volume of {n} voxels overflows u32 foreground indices"
        );
        let foreground = foreground_of(&labels);
        CaseVolume {
            id,
            shape,
            buffers: Buffers::Owned {
                image,
                labels,
                foreground,
            },
        }
    }

    /// A volume whose arrays live in `map` at `sections` (checked by the caller: in bounds,
    /// aligned, lengths matching `shape`).
    pub(crate) fn mapped(id: String, shape: [usize; 3], map: Arc<Mmap>, sections: MappedSections) -> Self {
        CaseVolume {
            id,
            shape,
            buffers: Buffers::Mapped { map, sections },
        }
    }

    /// Quantised intensities (`quantise(window_hu(hu))`), one per voxel.
    pub fn image(&self) -> &[u16] {
        match &self.buffers {
            Buffers::Owned { image, .. } => image,
            Buffers::Mapped { map, sections } => bytemuck::cast_slice(&map[sections.image.clone()]),
        }
    }

    /// Per-voxel class bitmask: bit `c` set means class `c` (channel order of
    /// `protocol::classes::CLASSES`) covers the voxel. AbdomenAtlas masks may overlap, hence a
    /// mask rather than one label per voxel.
    pub fn labels(&self) -> &[u32] {
        match &self.buffers {
            Buffers::Owned { labels, .. } => labels,
            Buffers::Mapped { map, sections } => bytemuck::cast_slice(&map[sections.labels.clone()]),
        }
    }

    /// Flat indices of voxels with any label, ascending, so foreground-centred sampling is one
    /// random index instead of a scan.
    pub fn foreground(&self) -> &[u32] {
        match &self.buffers {
            Buffers::Owned { foreground, .. } => foreground,
            Buffers::Mapped { map, sections } => bytemuck::cast_slice(&map[sections.foreground.clone()]),
        }
    }

    /// Whether the arrays were read from a cache file rather than prepared in this process.
    pub fn is_mapped(&self) -> bool {
        matches!(self.buffers, Buffers::Mapped { .. })
    }

    /// Windowed 0..1 intensity of voxel `index`.
    pub fn intensity(&self, index: usize) -> f32 {
        dequantise(self.image()[index])
    }

    pub fn voxel_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of voxels carrying class `c` (0 for a class index beyond the bitmask).
    pub fn class_voxels(&self, c: usize) -> usize {
        if c >= 32 {
            return 0;
        }
        let bit = 1u32 << c;
        self.labels().iter().filter(|l| **l & bit != 0).count()
    }

    /// Flat index of voxel `(z, y, x)`.
    pub fn index(&self, z: usize, y: usize, x: usize) -> usize {
        let [_, h, w] = self.shape;
        (z * h + y) * w + x
    }

    /// `(z, y, x)` of a flat index.
    pub fn coords(&self, index: usize) -> [usize; 3] {
        let [_, h, w] = self.shape;
        [index / (h * w), (index / w) % h, index % w]
    }

    /// Bytes of the arrays (owned or mapped).
    pub fn byte_size(&self) -> usize {
        self.image().len() * 2 + self.labels().len() * 4 + self.foreground().len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_matches_suprem_clip_and_scale() {
        assert_eq!(window_hu(-1000.0), 0.0);
        assert_eq!(window_hu(-175.0), 0.0);
        assert_eq!(window_hu(250.0), 1.0);
        assert_eq!(window_hu(700.0), 1.0);
        assert!((window_hu(37.5) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn quantisation_is_finer_than_one_hounsfield_unit() {
        assert_eq!(quantise(0.0), 0);
        assert_eq!(quantise(1.0), u16::MAX);
        assert_eq!(quantise(-0.3), 0);
        assert_eq!(quantise(1.7), u16::MAX);
        assert_eq!(quantise(f32::NAN), 0);
        let one_hu = 1.0 / 425.0;
        for hu in (-175..=250).step_by(7) {
            let x = window_hu(hu as f32);
            let back = dequantise(quantise(x));
            assert!((back - x).abs() <= 0.5 / 65535.0 + 1e-7, "{hu} HU");
            assert!((back - x).abs() < one_hu / 100.0);
            // Round trips are exact, so re-quantising a dequantised image changes nothing.
            assert_eq!(quantise(back), quantise(x));
        }
    }

    #[test]
    fn foreground_and_class_counts_follow_the_bitmask() {
        let shape = [2, 3, 4];
        let mut labels = vec![0u32; 24];
        labels[5] = 0b1;
        labels[7] = 0b11;
        labels[23] = 1 << 24;
        let vol = CaseVolume::new("c".into(), shape, vec![0.0; 24], labels);
        assert_eq!(vol.voxel_count(), 24);
        assert_eq!(vol.foreground(), &[5, 7, 23]);
        assert_eq!(vol.class_voxels(0), 2);
        assert_eq!(vol.class_voxels(1), 1);
        assert_eq!(vol.class_voxels(24), 1);
        assert_eq!(vol.class_voxels(3), 0);
        assert_eq!(vol.class_voxels(40), 0);
        assert!(!vol.is_mapped());
        assert_eq!(vol.byte_size(), 24 * 2 + 24 * 4 + 3 * 4);
    }

    #[test]
    fn index_is_z_major_x_fastest() {
        let vol = CaseVolume::new("c".into(), [2, 3, 4], vec![0.0; 24], vec![0; 24]);
        assert_eq!(vol.index(0, 0, 1), 1);
        assert_eq!(vol.index(0, 1, 0), 4);
        assert_eq!(vol.index(1, 0, 0), 12);
        assert_eq!(vol.coords(23), [1, 2, 3]);
        for i in 0..24 {
            let [z, y, x] = vol.coords(i);
            assert_eq!(vol.index(z, y, x), i);
        }
    }
}
