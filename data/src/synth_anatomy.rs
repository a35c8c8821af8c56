//! The phantom's anatomy: where each of the 25 structures sits, what it looks like in CT, and in
//! what order it is painted into one label per voxel.
//!
//! Kept apart from file writing so the geometry can be read (and tuned) as one table. Positions
//! are normalised to the field of view: `u` runs to the patient's right, `v` anterior, `w`
//! superior, each in −1..1, matching the RAS+ affine the writer puts in the header. Structures are
//! painted in table order and later ones overwrite earlier ones, so small structures come last and
//! always survive; every voxel ends with exactly one label, which keeps masks and CT consistent.

use protocol::classes::{CLASSES, class_index};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::synth_raster::{Grid, gaussian, paint_blob, paint_segment};

/// A rendered case on the file grid: `hu` and `label` are in `[z, y, x]` order with RAS voxel
/// axes; `label` is 0 for background and `c + 1` for class `c`.
pub(crate) struct Phantom {
    pub hu: Vec<i16>,
    pub label: Vec<u8>,
}

#[derive(Clone, Copy)]
enum Shape {
    /// Centre and radii in normalised `(u, v, w)`; `yaw` turns it in the axial plane; `wobble`
    /// lobulates the outline so organs are not perfect ellipsoids.
    Blob {
        c: [f32; 3],
        r: [f32; 3],
        yaw: f32,
        wobble: f32,
    },
    /// A tube of normalised radius `r` along a polyline.
    Tube { pts: &'static [[f32; 3]], r: f32 },
}

struct Structure {
    class: &'static str,
    hu: f32,
    /// Vessels and the gut tube hang off each other; jittering them independently would tear
    /// the celiac trunk off the aorta, so they only follow the whole-case shift.
    rigid: bool,
    shapes: &'static [Shape],
}

const fn blob(c: [f32; 3], r: [f32; 3], yaw: f32, wobble: f32) -> Shape {
    Shape::Blob { c, r, yaw, wobble }
}

const fn organ(class: &'static str, hu: f32, shapes: &'static [Shape]) -> Structure {
    Structure {
        class,
        hu,
        rigid: false,
        shapes,
    }
}

const fn vessel(class: &'static str, hu: f32, shapes: &'static [Shape]) -> Structure {
    Structure {
        class,
        hu,
        rigid: true,
        shapes,
    }
}

const fn tube(r: f32, pts: &'static [[f32; 3]]) -> Shape {
    Shape::Tube { pts, r }
}

const FEMUR_HU: f32 = 700.0;

/// Painting order matters: big, low structures first, small and vascular ones last.
/// Blob: centre (u, v, w), radii, yaw, wobble. Tube: radius, polyline.
#[rustfmt::skip]
const ANATOMY: &[Structure] = &[
    organ("intestine", 45.0, &[blob([0.0, 0.12, -0.28], [0.45, 0.38, 0.26], 0.0, 0.15)]),
    vessel("colon", 0.0, &[tube(0.08, &[
        [0.46, 0.0, -0.50], [0.46, 0.10, 0.02], [0.40, 0.30, 0.08], [-0.40, 0.30, 0.08],
        [-0.46, 0.05, 0.02], [-0.46, 0.0, -0.48], [-0.18, -0.20, -0.58],
    ])]),
    organ("lung_right", -800.0, &[blob([0.36, -0.02, 0.72], [0.27, 0.45, 0.30], 0.0, 0.05)]),
    organ("lung_left", -800.0, &[blob([-0.36, -0.02, 0.72], [0.27, 0.45, 0.30], 0.0, 0.05)]),
    organ("liver", 60.0, &[blob([0.30, 0.02, 0.30], [0.40, 0.46, 0.25], 0.3, 0.10)]),
    organ("spleen", 50.0, &[blob([-0.50, -0.22, 0.30], [0.15, 0.22, 0.16], -0.5, 0.08)]),
    organ("stomach", 30.0, &[blob([-0.22, 0.20, 0.34], [0.22, 0.18, 0.17], 0.4, 0.12)]),
    organ("kidney_right", 150.0, &[blob([0.36, -0.32, 0.02], [0.13, 0.11, 0.19], 0.35, 0.0)]),
    organ("kidney_left", 150.0, &[blob([-0.36, -0.32, 0.08], [0.13, 0.11, 0.19], -0.35, 0.0)]),
    organ("pancreas", 90.0, &[blob([-0.12, 0.0, 0.10], [0.28, 0.07, 0.06], -0.2, 0.10)]),
    vessel("duodenum", 35.0, &[tube(0.055, &[
        [0.12, 0.12, 0.24], [0.24, 0.04, 0.10], [0.18, -0.02, -0.04], [0.0, 0.0, -0.06],
    ])]),
    organ("bladder", 10.0, &[blob([0.0, 0.22, -0.66], [0.20, 0.18, 0.14], 0.0, 0.0)]),
    vessel("rectum", 15.0, &[tube(0.08, &[[0.0, -0.34, -0.56], [0.0, -0.36, -0.90]])]),
    organ("prostate", 45.0, &[blob([0.0, 0.06, -0.82], [0.08, 0.07, 0.07], 0.0, 0.0)]),
    organ("femur_right", FEMUR_HU, &[
        blob([0.42, 0.0, -0.74], [0.12, 0.12, 0.12], 0.0, 0.0),
        tube(0.09, &[[0.42, 0.0, -0.74], [0.52, 0.06, -1.05]]),
    ]),
    organ("femur_left", FEMUR_HU, &[
        blob([-0.42, 0.0, -0.74], [0.12, 0.12, 0.12], 0.0, 0.0),
        tube(0.09, &[[-0.42, 0.0, -0.74], [-0.52, 0.06, -1.05]]),
    ]),
    organ("gall_bladder", 20.0, &[blob([0.28, 0.34, 0.12], [0.08, 0.10, 0.08], 0.2, 0.0)]),
    vessel("esophagus", 40.0, &[tube(0.045, &[
        [0.0, -0.18, 1.05], [-0.04, -0.14, 0.50], [-0.14, 0.08, 0.38],
    ])]),
    vessel("aorta", 200.0, &[tube(0.07, &[[-0.06, -0.30, 1.05], [-0.06, -0.30, -0.42]])]),
    vessel("postcava", 130.0, &[tube(0.065, &[[0.14, -0.26, 0.55], [0.12, -0.26, -0.42]])]),
    vessel("portal_vein_and_splenic_vein", 170.0, &[tube(0.05, &[
        [-0.44, -0.14, 0.16], [0.06, -0.06, 0.14], [0.24, 0.0, 0.26],
    ])]),
    vessel("hepatic_vessel", 160.0, &[
        tube(0.035, &[[0.22, -0.05, 0.32], [0.48, 0.10, 0.38]]),
        tube(0.035, &[[0.22, -0.05, 0.32], [0.40, -0.15, 0.44]]),
        tube(0.035, &[[0.22, -0.05, 0.32], [0.30, 0.25, 0.30]]),
    ]),
    vessel("celiac_trunk", 200.0, &[tube(0.05, &[[-0.06, -0.28, 0.20], [-0.06, -0.06, 0.22]])]),
    organ("adrenal_gland_right", 25.0, &[blob([0.26, -0.30, 0.26], [0.07, 0.08, 0.09], 0.5, 0.0)]),
    organ("adrenal_gland_left", 25.0, &[blob([-0.26, -0.28, 0.30], [0.07, 0.08, 0.09], -0.5, 0.0)]),
];

const AIR_HU: f32 = -1000.0;
const FAT_HU: f32 = -100.0;
const MUSCLE_HU: f32 = 40.0;
/// Below this many voxels of radius a structure can vanish between voxel centres.
const MIN_RADIUS_VOX: f32 = 1.2;

/// The normalised → physical mapping for one case, with its global shift and body scale folded
/// in. Physical units are voxels of the training grid (`shape`, 1.5 mm); `grid` is the file's.
struct Frame {
    grid: Grid,
    centre: [f32; 3],
    half: [f32; 3],
    scale: f32,
}

impl Frame {
    /// Voxel `(z, y, x)` of normalised `(u, v, w)`; `u, v` shrink with the body, `w` does not
    /// (every case spans lungs to femurs).
    fn voxel(&self, p: [f32; 3]) -> [f32; 3] {
        [
            self.centre[0] + p[2] * self.half[0],
            self.centre[1] + p[1] * self.scale * self.half[1],
            self.centre[2] + p[0] * self.scale * self.half[2],
        ]
    }
}

/// Renders one case designed for the training grid `shape` onto the file grid `grid`, which
/// covers the same physical extent. Everything random comes from `rng`, so a case is a pure
/// function of its seed and stream (and of the two grids).
pub(crate) fn render(shape: [usize; 3], grid: Grid, rng: &mut ChaCha8Rng) -> Phantom {
    let n = grid.len();
    let half = shape.map(|d| d as f32 / 2.0);
    // About ±3 voxels at 64³, proportionally less on smaller grids so nothing slides out.
    let shift = shape.map(|d| d as f32 * 0.047 * rng.random_range(-1.0f32..=1.0));
    let frame = Frame {
        grid,
        centre: [0, 1, 2].map(|a| (shape[a] as f32 - 1.0) / 2.0 + shift[a]),
        half,
        scale: rng.random_range(0.90f32..=1.05),
    };
    let mut hu = vec![AIR_HU; n];
    let mut label = vec![0u8; n];
    paint_body(&frame, rng, &mut hu);

    // A structure's HU is drawn once per case, so neighbours keep their contrast.
    for s in ANATOMY {
        let Some(class) = class_index(s.class) else {
            unreachable!("anatomy table names unknown class {}", s.class)
        };
        let organ_hu = s.hu + rng.random_range(-8.0f32..=8.0);
        let jitter = if s.rigid {
            [0.0; 3]
        } else {
            shape.map(|d| d as f32 * 0.03 * rng.random_range(-1.0f32..=1.0))
        };
        let size = [0, 1, 2].map(|_| rng.random_range(0.85f32..=1.15));
        let yaw_jitter = rng.random_range(-0.25f32..=0.25);
        let phase = rng.random_range(0.0f32..std::f32::consts::TAU);
        for shape in s.shapes {
            let mut set = |i: usize| {
                hu[i] = organ_hu;
                label[i] = class as u8 + 1;
            };
            match *shape {
                Shape::Blob { c, r, yaw, wobble } => {
                    let mut centre = frame.voxel(c);
                    for a in 0..3 {
                        centre[a] += jitter[a];
                    }
                    let radii = [
                        r[2] * size[2] * half[0],
                        r[1] * size[1] * frame.scale * half[1],
                        r[0] * size[0] * frame.scale * half[2],
                    ]
                    .map(|x| x.max(MIN_RADIUS_VOX));
                    paint_blob(frame.grid, centre, radii, yaw + yaw_jitter, wobble, phase, &mut set);
                }
                Shape::Tube { pts, r } => {
                    let radius = (r * size[0] * frame.scale * half[1].min(half[2])).max(MIN_RADIUS_VOX);
                    for seg in pts.windows(2) {
                        let mut a = frame.voxel(seg[0]);
                        let mut b = frame.voxel(seg[1]);
                        for k in 0..3 {
                            a[k] += jitter[k];
                            b[k] += jitter[k];
                        }
                        paint_segment(frame.grid, a, b, radius, &mut set);
                    }
                }
            }
        }
    }
    debug_assert_eq!(ANATOMY.len(), CLASSES.len());

    let sigma = rng.random_range(15.0f32..=25.0);
    let hu = hu
        .into_iter()
        .map(|v| (v + sigma * gaussian(rng)).round().clamp(-1024.0, 3071.0) as i16)
        .collect();
    Phantom { hu, label }
}

/// An elliptic cylinder of fat with a muscle rim, the whole height of the volume.
fn paint_body(frame: &Frame, rng: &mut ChaCha8Rng, hu: &mut [f32]) {
    let grid = frame.grid;
    let [d, h, w] = grid.dims;
    let ay = 0.66 * frame.scale * frame.half[1] * rng.random_range(0.95f32..=1.05);
    let ax = 0.86 * frame.scale * frame.half[2] * rng.random_range(0.95f32..=1.05);
    let rim = rng.random_range(0.84f32..=0.89);
    for y in 0..h {
        for x in 0..w {
            let dy = (grid.pos(1, y) - frame.centre[1]) / ay;
            let dx = (grid.pos(2, x) - frame.centre[2]) / ax;
            let rho = (dx * dx + dy * dy).sqrt();
            let value = if rho > 1.0 {
                continue;
            } else if rho > rim {
                MUSCLE_HU
            } else {
                FAT_HU
            };
            for z in 0..d {
                hu[grid.index(z, y, x)] = value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn anatomy_table_covers_every_class_once() {
        let mut seen = [0usize; CLASSES.len()];
        for s in ANATOMY {
            let c = class_index(s.class).expect("anatomy names a known class");
            seen[c] += 1;
        }
        assert!(seen.iter().all(|&n| n == 1), "per-class entries: {seen:?}");
    }

    #[test]
    fn every_class_survives_painting_even_on_a_small_grid() {
        for shape in [[64, 64, 64], [32, 32, 32], [24, 40, 48]] {
            for case in 0..4 {
                let mut rng = ChaCha8Rng::seed_from_u64(7);
                rng.set_stream(case);
                let p = render(shape, Grid::unit(shape), &mut rng);
                let floor = if shape == [64, 64, 64] { 30 } else { 1 };
                for (c, class) in CLASSES.iter().enumerate() {
                    let count = p.label.iter().filter(|&&l| l as usize == c + 1).count();
                    assert!(count >= floor, "{class} has {count} voxels at {shape:?}");
                }
            }
        }
    }

    #[test]
    fn every_class_survives_on_an_anisotropic_grid() {
        // 0.8 x 0.8 x 2.5 mm voxels covering a 32^3 training grid of 1.5 mm.
        let grid = Grid {
            dims: [20, 59, 59],
            step: [2.5 / 1.5, 0.8 / 1.5, 0.8 / 1.5],
        };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let p = render([32, 32, 32], grid, &mut rng);
        assert_eq!(p.label.len(), grid.len());
        for (c, class) in CLASSES.iter().enumerate() {
            let count = p.label.iter().filter(|&&l| l as usize == c + 1).count();
            assert!(count >= 1, "{class} has {count} voxels");
        }
    }
}
