//! [`EcMatmul`]: `y = W x` with `W` held as an [`EcTensor`], on whichever path a [`Strategy`] picks.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::EcTensor;
use crate::rans::{self, DecodeTable, LANES};

/// How an [`EcMatmul`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// Decode, dequantize and multiply in one GPU kernel; holds only the compressed stream.
    Fused,
    /// Decode once at load into packed symbols; each call runs a quantized GEMV on the GPU.
    Cached,
    /// The CPU reference path (rayon over row tiles); holds only the compressed stream.
    Cpu,
}

/// A matrix-vector (and matrix-matrix) product with an encoded weight.
pub struct EcMatmul {
    backend: Backend,
}

enum Backend {
    Cpu(CpuMatmul),
}

impl EcMatmul {
    /// The CPU path: decodes each row tile on the fly while multiplying, in parallel over row tiles.
    pub fn cpu(tensor: &EcTensor) -> Self {
        Self { backend: Backend::Cpu(CpuMatmul::new(tensor.clone())) }
    }

    /// Rows `N` of the weight: the length of `y`.
    pub fn rows(&self) -> usize {
        match &self.backend {
            Backend::Cpu(c) => c.tensor.rows(),
        }
    }

    /// Columns `K` of the weight: the length of `x`.
    pub fn cols(&self) -> usize {
        match &self.backend {
            Backend::Cpu(c) => c.tensor.cols(),
        }
    }

    /// The strategy this product runs with.
    pub fn strategy(&self) -> Strategy {
        match &self.backend {
            Backend::Cpu(_) => Strategy::Cpu,
        }
    }

    /// `y = W x` for one vector: `x` has `cols` entries, `y` has `rows`.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.matmul(x, 1, y)
    }

    /// `Y = X W^T` for `m` vectors: `x` is row-major `m x cols`, `y` row-major `m x rows`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        check_len("x", x.len(), m * self.cols())?;
        check_len("y", y.len(), m * self.rows())?;
        match &self.backend {
            Backend::Cpu(c) => c.matmul(x, m, y),
        }
    }
}

fn check_len(what: &str, actual: usize, expected: usize) -> Result<()> {
    if actual != expected {
        return Err(Error::ShapeMismatch { what: what.into(), expected, actual });
    }
    Ok(())
}

struct CpuMatmul {
    tensor: EcTensor,
    dtable: DecodeTable,
}

impl CpuMatmul {
    fn new(tensor: EcTensor) -> Self {
        let dtable = DecodeTable::new(tensor.table());
        Self { tensor, dtable }
    }

    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        let t = &self.tensor;
        let (n, k, gs) = (t.rows(), t.cols(), t.group_size());
        let groups = k / gs;
        // Each row tile yields its 32 (or fewer) outputs for all m vectors: out[v][row].
        let tiles: Vec<Vec<f32>> = (0..t.layout().row_tiles())
            .into_par_iter()
            .map(|rt| {
                let active = (n - rt * LANES).min(LANES);
                let mut q = vec![0u8; active * k];
                rans::decode_row_tile(t.stream(), t.layout(), &self.dtable, rt, &mut q)?;
                let mut out = vec![0f32; m * active];
                for v in 0..m {
                    let xv = &x[v * k..(v + 1) * k];
                    for r in 0..active {
                        let row = rt * LANES + r;
                        let mut acc = 0f32;
                        for g in 0..groups {
                            let (qs, xs) = (&q[r * k + g * gs..r * k + (g + 1) * gs], &xv[g * gs..(g + 1) * gs]);
                            let (mut qx, mut sx) = (0f32, 0f32);
                            for (&qi, &xi) in qs.iter().zip(xs) {
                                qx += qi as f32 * xi;
                                sx += xi;
                            }
                            acc += t.scales()[row * groups + g] * qx + t.biases()[row * groups + g] * sx;
                        }
                        out[v * active + r] = acc;
                    }
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        for (rt, out) in tiles.iter().enumerate() {
            let active = out.len() / m.max(1);
            for v in 0..m {
                y[v * n + rt * LANES..v * n + rt * LANES + active].copy_from_slice(&out[v * active..(v + 1) * active]);
            }
        }
        Ok(())
    }
}
