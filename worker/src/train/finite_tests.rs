use burn::module::{ModuleMapper, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::*;
use crate::backend::Cpu;
use crate::model::{Backbone, test_unet};
use crate::train::params;

fn model() -> Backbone<Cpu> {
    test_unet(3, 2, 2).init_seeded(&Default::default(), 7).unwrap()
}

/// Multiplies the `index`-th float param (visit order) by `value`, e.g. NaN.
fn poison(model: Backbone<Cpu>, index: usize, value: f32) -> Backbone<Cpu> {
    struct Poison {
        index: usize,
        seen: usize,
        value: f32,
    }
    impl<B: Backend> ModuleMapper<B> for Poison {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let hit = self.seen == self.index;
            self.seen += 1;
            if hit {
                param.map(|t| t.mul_scalar(self.value))
            } else {
                param
            }
        }
    }
    model.map(&mut Poison { index, seen: 0, value })
}

#[test]
fn the_checked_checksum_is_the_checksum_and_slots_are_the_exchange_layout() {
    let model = model();
    assert_eq!(checked_checksum(&model, 3).unwrap(), params::weights_checksum(&model));
    let slots = slot_names(&model);
    let lens: Vec<usize> = slots.iter().map(|(_, len)| *len).collect();
    assert_eq!(lens, params::param_lens(&model));
    // Module paths, without the backbone's variant.
    assert!(
        slots
            .iter()
            .all(|(name, _)| !name.is_empty() && !name.starts_with("Unet")),
        "{slots:?}"
    );
    assert!(slots[0].0.ends_with("weight"), "{slots:?}");
}

#[test]
fn a_nan_weight_is_named_with_the_step() {
    let clean = model();
    let slots = slot_names(&clean);
    let index = 4;
    let poisoned = poison(clean, index, f32::NAN);
    // The plain checksum hashes NaNs like any other bits: it alone never noticed.
    let _ = params::weights_checksum(&poisoned);
    let err = checked_checksum(&poisoned, 12).unwrap_err();
    let (name, len) = &slots[index];
    assert_eq!(
        err,
        NonFinite::Tensor {
            step: 12,
            kind: "weight",
            tensor: name.clone(),
            count: *len,
            len: *len,
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("step 12") && text.contains(&format!("`{name}`")),
        "{text}"
    );
}

#[test]
fn a_non_finite_gradient_is_named_by_its_slot() {
    let model = model();
    let slots = slot_names(&model);
    let total: usize = slots.iter().map(|(_, len)| len).sum();
    let mut flat = vec![0.5f32; total];
    check_exchange(5, &flat, &slots).unwrap();
    // Into the third param's slot.
    let at = slots[0].1 + slots[1].1 + 1;
    flat[at] = f32::INFINITY;
    let err = check_exchange(5, &flat, &slots).unwrap_err();
    assert!(
        matches!(&err, NonFinite::Tensor { step: 5, kind: "averaged gradient", tensor, count: 1, .. } if *tensor == slots[2].0),
        "{err}"
    );
}

#[test]
fn finiteness_is_exact_at_every_position() {
    for len in [0, 1, 15, 16, 17, 40] {
        let clean: Vec<f32> = (0..len).map(|i| if i % 2 == 0 { f32::MAX } else { -0.0 }).collect();
        assert!(all_finite(&clean), "{len}");
        for at in 0..len {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut v = clean.clone();
                v[at] = bad;
                assert!(!all_finite(&v), "{len} {at} {bad}");
            }
        }
    }
}

#[test]
fn a_non_finite_loss_is_refused_with_its_parts() {
    let ok = LossParts {
        total: 1.0,
        bce: 0.5,
        dice: 0.5,
    };
    check_loss(1, &ok).unwrap();
    let err = check_loss(9, &LossParts { bce: f32::NAN, ..ok }).unwrap_err();
    assert!(
        err.to_string().contains("step 9") && err.to_string().contains("bce NaN"),
        "{err}"
    );
}
