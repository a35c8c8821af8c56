//! One decoded, windowed CT case held in memory, in the layout the model consumes.
//!
//! Layout: shape is `[D, H, W]` = `[z, y, x]` and the flat index of voxel `(z, y, x)` is
//! `(z * H + y) * W + x` (x fastest). That is exactly burn's `[N, C, D, H, W]` with the batch and
//! channel axes dropped, so crops copy contiguous x-runs straight into tensor buffers. It is also
//! NIfTI's on-disk (Fortran, x fastest) order, so decoding needs no transposition.

use protocol::classes::NUM_CLASSES;

// A u32 bitmask holds every class of a voxel; widening it is a one-line change if the class list
// ever outgrows it, and this makes that change impossible to forget.
const _: () = assert!(NUM_CLASSES <= 32, "labels are a u32 bitmask per voxel");

/// SuPreM's intensity preprocessing: clip Hounsfield units to −175..250 and scale to 0..1.
pub fn window_hu(hu: f32) -> f32 {
    ((hu + 175.0) / 425.0).clamp(0.0, 1.0)
}

/// A case ready for cropping.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseVolume {
    /// The case folder name, e.g. `BDMAP_00000001`.
    pub id: String,
    /// `[D, H, W]` = `[z, y, x]`.
    pub shape: [usize; 3],
    /// Windowed intensities (`window_hu`), one per voxel, in the layout described above.
    pub image: Vec<f32>,
    /// Per-voxel class bitmask: bit `c` set means class `c` (channel order of
    /// `protocol::classes::CLASSES`) covers the voxel. AbdomenAtlas masks may overlap, hence a
    /// mask rather than one label per voxel.
    pub labels: Vec<u32>,
    /// Flat indices of voxels with any label, ascending, so foreground-centred sampling is one
    /// random index instead of a scan.
    pub foreground: Vec<u32>,
}

impl CaseVolume {
    /// Builds a volume from windowed intensities and bitmask labels, deriving `foreground`.
    ///
    /// Panics only on a programming error (buffer lengths that disagree with `shape`); the
    /// loader checks shapes against the files before calling this.
    pub fn new(id: String, shape: [usize; 3], image: Vec<f32>, labels: Vec<u32>) -> Self {
        let n = shape.iter().product::<usize>();
        assert_eq!(image.len(), n, "image length does not match shape {shape:?}");
        assert_eq!(labels.len(), n, "labels length does not match shape {shape:?}");
        assert!(
            n <= u32::MAX as usize,
            "volume of {n} voxels overflows u32 foreground indices"
        );
        let foreground = labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != 0)
            .map(|(i, _)| i as u32)
            .collect();
        CaseVolume {
            id,
            shape,
            image,
            labels,
            foreground,
        }
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
        self.labels.iter().filter(|l| **l & bit != 0).count()
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
    fn foreground_and_class_counts_follow_the_bitmask() {
        let shape = [2, 3, 4];
        let mut labels = vec![0u32; 24];
        labels[5] = 0b1;
        labels[7] = 0b11;
        labels[23] = 1 << 24;
        let vol = CaseVolume::new("c".into(), shape, vec![0.0; 24], labels);
        assert_eq!(vol.voxel_count(), 24);
        assert_eq!(vol.foreground, vec![5, 7, 23]);
        assert_eq!(vol.class_voxels(0), 2);
        assert_eq!(vol.class_voxels(1), 1);
        assert_eq!(vol.class_voxels(24), 1);
        assert_eq!(vol.class_voxels(3), 0);
        assert_eq!(vol.class_voxels(40), 0);
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
