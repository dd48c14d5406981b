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
        if n == 0 || m == 0 {
            return Ok(());
        }
        if k == 0 {
            // An empty sum: every output is 0.
            y.fill(0.0);
            return Ok(());
        }
        let groups = k / gs;
        // sum(x) per vector and group, shared by every row: w = scale * q + bias gives
        // sum_k w x = sum_g scale_g * sum(q x) + bias_g * sum(x).
        let x_sums: Vec<f32> = x.chunks_exact(gs).map(|xs| xs.iter().sum()).collect();
        // Outputs row-major n x m (one contiguous chunk per row tile), transposed into y at the end.
        let mut y_t = vec![0f32; n * m];
        y_t.par_chunks_mut(LANES * m).enumerate().try_for_each_init(
            || (vec![0u8; LANES * k], vec![0f32; gs]),
            |(q, q_f32), (rt, out)| -> Result<()> {
                let active = out.len() / m;
                let q = &mut q[..active * k];
                rans::decode_row_tile(t.stream(), t.layout(), &self.dtable, rt, q)?;
                for (r, (q_row, out_row)) in q.chunks_exact(k).zip(out.chunks_exact_mut(m)).enumerate() {
                    let row = rt * LANES + r;
                    let scales = &t.scales()[row * groups..(row + 1) * groups];
                    let biases = &t.biases()[row * groups..(row + 1) * groups];
                    if m == 1 {
                        out_row[0] = row_dot(q_row, x, &x_sums, gs, scales, biases);
                        continue;
                    }
                    // Several vectors: convert each group's symbols to f32 once and reuse them for every vector.
                    out_row.fill(0.0);
                    for g in 0..groups {
                        let qf = &mut q_f32[..];
                        for (f, &s) in qf.iter_mut().zip(&q_row[g * gs..(g + 1) * gs]) {
                            *f = s as f32;
                        }
                        for (v, y) in out_row.iter_mut().enumerate() {
                            let xs = &x[v * k + g * gs..v * k + (g + 1) * gs];
                            *y += scales[g] * dot_f32(qf, xs) + biases[g] * x_sums[v * groups + g];
                        }
                    }
                }
                Ok(())
            },
        )?;
        for (row, ys) in y_t.chunks_exact(m).enumerate() {
            for (v, &value) in ys.iter().enumerate() {
                y[v * n + row] = value;
            }
        }
        Ok(())
    }
}

/// One row against one vector: `sum_g scale_g * sum(q x) + bias_g * sum(x)`.
#[inline]
fn row_dot(q_row: &[u8], x: &[f32], x_sums: &[f32], gs: usize, scales: &[f32], biases: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (g, ((qs, xs), &sx)) in q_row.chunks_exact(gs).zip(x.chunks_exact(gs)).zip(x_sums).enumerate() {
        acc += scales[g] * dot_u8_f32(qs, xs) + biases[g] * sx;
    }
    acc
}

/// `sum(q[i] * x[i])` over one group, with 8 independent accumulators so the compiler can vectorize it and
/// the additions do not form one long dependency chain.
#[inline]
fn dot_u8_f32(q: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (qc, xc) in q.chunks_exact(8).zip(x.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += qc[i] as f32 * xc[i];
        }
    }
    let tail: f32 =
        q.chunks_exact(8).remainder().iter().zip(x.chunks_exact(8).remainder()).map(|(&q, &x)| q as f32 * x).sum();
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

/// [`dot_u8_f32`] with the symbols already converted to `f32`.
#[inline]
fn dot_f32(q: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (qc, xc) in q.chunks_exact(8).zip(x.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += qc[i] * xc[i];
        }
    }
    let tail: f32 = q.chunks_exact(8).remainder().iter().zip(x.chunks_exact(8).remainder()).map(|(&q, &x)| q * x).sum();
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}
