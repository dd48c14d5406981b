//! Heavy-tailed synthetic weights, shared by tests/rans_size.rs and benches/codec.rs (included with `#[path]`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Student-t samples with `nu` degrees of freedom by Bailey's polar method: for `(u, v)` uniform in the unit
/// disc, `w = u^2 + v^2`, `t = u * sqrt(nu * (w^(-2/nu) - 1) / w)`.
pub fn student_t(n: usize, nu: f64, scale: f64, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (u, v): (f64, f64) = (rng.gen_range(-1.0..1.0), rng.gen_range(-1.0..1.0));
        let w = u * u + v * v;
        if w > 0.0 && w < 1.0 {
            out.push((scale * u * (nu * (w.powf(-2.0 / nu) - 1.0) / w).sqrt()) as f32);
        }
    }
    out
}
