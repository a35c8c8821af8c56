//! Learning-rate schedule of the SuPreM recipe: linear warm-up, then cosine decay to zero.

/// Learning rate for `step` (0-based) of a `total`-step run.
pub fn warmup_cosine(base_lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step < warmup {
        return base_lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::warmup_cosine;

    #[test]
    fn warms_up_then_decays() {
        assert!((warmup_cosine(1.0, 0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((warmup_cosine(1.0, 9, 10, 100) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(1.0, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!(warmup_cosine(1.0, 55, 10, 100) < 0.6);
        assert!(warmup_cosine(1.0, 99, 10, 100) < 0.01);
        assert!((warmup_cosine(2.0, 0, 0, 10) - 2.0).abs() < 1e-12);
    }
}
