//! The HU window, SuPreM's `ScaleIntensityRanged(a_min=-175, a_max=250, b_min=0, b_max=1,
//! clip=True)`: soft-tissue contrast is what the 25 classes differ in, so everything below fat and
//! above contrast-filled vessels is clipped, and the rest scaled to 0..1 in MONAI's operation order.

/// SuPreM's window in Hounsfield units.
pub const SUPREM_HU_WINDOW: (f32, f32) = (-175.0, 250.0);

/// Maps `hu` to `(hu - hu_min) / (hu_max - hu_min)`, clipped to 0..1.
pub fn window(hu: f32, hu_min: f32, hu_max: f32) -> f32 {
    ((hu - hu_min) / (hu_max - hu_min)).clamp(0.0, 1.0)
}

/// SuPreM's window, −175..250 HU.
pub fn window_hu(hu: f32) -> f32 {
    window(hu, SUPREM_HU_WINDOW.0, SUPREM_HU_WINDOW.1)
}

/// Windows a whole buffer in place.
pub fn window_in_place(data: &mut [f32], hu_min: f32, hu_max: f32) {
    let scale = hu_max - hu_min;
    for v in data {
        *v = ((*v - hu_min) / scale).clamp(0.0, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_and_scales_like_scale_intensity_ranged() {
        assert_eq!(window_hu(-1000.0), 0.0);
        assert_eq!(window_hu(-175.0), 0.0);
        assert_eq!(window_hu(250.0), 1.0);
        assert_eq!(window_hu(3000.0), 1.0);
        assert!((window_hu(37.5) - 0.5).abs() < 1e-7);
        assert!((window(0.0, -100.0, 100.0) - 0.5).abs() < 1e-7);
        let mut buf = vec![-500.0, -175.0, 37.5, 250.0, 900.0];
        window_in_place(&mut buf, -175.0, 250.0);
        let one_by_one: Vec<f32> = [-500.0, -175.0, 37.5, 250.0, 900.0].map(window_hu).to_vec();
        assert_eq!(buf, one_by_one);
    }

    #[test]
    fn agrees_with_the_loader_window() {
        for hu in (-1200..1200).step_by(7) {
            let hu = hu as f32 + 0.25;
            assert_eq!(window_hu(hu), crate::volume::window_hu(hu), "{hu}");
        }
    }
}
