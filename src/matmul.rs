//! [`EcMatmul`]: `y = W x` with `W` held as an [`EcTensor`], on whichever path a [`Strategy`] picks.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::EcTensor;
#[cfg(feature = "gpu")]
use crate::gpu::GpuContext;
use crate::rans::{DecodeTable, LANES};

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
    Cpu(Box<CpuMatmul>),
    #[cfg(feature = "gpu")]
    Gpu(Box<gpu::GpuMatmul>),
}

impl EcMatmul {
    /// A product on `ctx`'s device with `strategy`: [`Strategy::Fused`] uploads only the compressed stream,
    /// [`Strategy::Cached`] decodes it once on the device (checking every tile) and keeps only the packed
    /// symbols, [`Strategy::Cpu`] is [`EcMatmul::cpu`]. Scales and biases go to the device as `f32`.
    ///
    /// On Metal, [`Strategy::Fused`] runs the hand-written MSL kernel for up to 8 vectors and checks every tile
    /// once at load ([`Error::CorruptStream`] for a failing one); see [`crate::gpu::FusedSource`] to force the
    /// WGSL kernel.
    ///
    /// The GPU strategies need a group size that is a multiple of 32 and rows of whole `u32` words
    /// (`cols * bits % 32 == 0`); arrays above the device's storage binding limit are refused.
    #[cfg(feature = "gpu")]
    pub fn new(ctx: &GpuContext, tensor: &EcTensor, strategy: Strategy) -> Result<Self> {
        match strategy {
            Strategy::Cpu => Ok(Self::cpu(tensor)),
            Strategy::Fused | Strategy::Cached => {
                Ok(Self { backend: Backend::Gpu(Box::new(gpu::GpuMatmul::new(ctx, tensor, strategy)?)) })
            }
        }
    }

    /// The CPU path: decodes each row tile on the fly while multiplying, in parallel over row tiles.
    pub fn cpu(tensor: &EcTensor) -> Self {
        Self { backend: Backend::Cpu(Box::new(CpuMatmul::new(tensor.clone()))) }
    }

    /// Rows `N` of the weight: the length of `y`.
    pub fn rows(&self) -> usize {
        match &self.backend {
            Backend::Cpu(c) => c.tensor.rows(),
            #[cfg(feature = "gpu")]
            Backend::Gpu(g) => g.rows,
        }
    }

    /// Columns `K` of the weight: the length of `x`.
    pub fn cols(&self) -> usize {
        match &self.backend {
            Backend::Cpu(c) => c.tensor.cols(),
            #[cfg(feature = "gpu")]
            Backend::Gpu(g) => g.cols,
        }
    }

    /// The strategy this product runs with.
    pub fn strategy(&self) -> Strategy {
        match &self.backend {
            Backend::Cpu(_) => Strategy::Cpu,
            #[cfg(feature = "gpu")]
            Backend::Gpu(g) => g.strategy,
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
            #[cfg(feature = "gpu")]
            Backend::Gpu(g) => g.matmul(x, m, y),
        }
    }

    /// [`matvec`](Self::matvec) with an `f16` input (converted to `f32` on the host).
    pub fn matvec_f16(&self, x: &[half::f16], y: &mut [f32]) -> Result<()> {
        self.matmul_f16(x, 1, y)
    }

    /// [`matmul`](Self::matmul) with `f16` inputs (converted to `f32` on the host).
    pub fn matmul_f16(&self, x: &[half::f16], m: usize, y: &mut [f32]) -> Result<()> {
        let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        self.matmul(&x, m, y)
    }

    /// Records `Y = X W^T` for `m` vectors into `encoder`, in a compute pass of its own, for use inside another
    /// wgpu program without copies: `x` is a storage buffer of `m x cols` f32, `y` a storage buffer of
    /// `m x rows` f32, both on this product's device. Nothing is submitted. Fails for [`Strategy::Cpu`].
    #[cfg(feature = "gpu")]
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<()> {
        self.encode_pass(&mut encoder.begin_compute_pass(&Default::default()), x, y, m)
    }

    /// [`encode`](Self::encode) into a compute pass the caller began, so that many products (a whole layer, a
    /// whole model) share one pass: wgpu places the barriers between dispatches that read what an earlier one
    /// wrote, and records every pass as command buffers of its own: on an H200's driver an empty pass costs
    /// about 3.4 us of device time back to back, one more dispatch inside a pass 0.2-0.4 us (BENCHMARKS.md, the
    /// timing floor).
    #[cfg(feature = "gpu")]
    pub fn encode_pass(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<()> {
        match &self.backend {
            Backend::Cpu(_) => Err(Error::param("strategy", "Strategy::Cpu has no device; use matmul")),
            Backend::Gpu(g) => g.encode_pass(pass, x, y, m),
        }
    }

    /// Device time of `runs` back-to-back products of `m` vectors (whatever the vectors hold), each in a
    /// compute pass of its own and measured with that pass's timestamps; see
    /// [`crate::gpu::time_passes_on_device`]. Fails for [`Strategy::Cpu`] and on devices without
    /// `Features::TIMESTAMP_QUERY`.
    #[cfg(feature = "gpu")]
    pub fn device_times(&self, m: usize, runs: usize) -> Result<Vec<std::time::Duration>> {
        match &self.backend {
            Backend::Cpu(_) => Err(Error::param("strategy", "Strategy::Cpu has no device; time matmul instead")),
            Backend::Gpu(g) => g.device_times(m, runs),
        }
    }

    /// Bytes this product holds on the device (0 on the CPU path).
    pub fn device_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Cpu(_) => 0,
            #[cfg(feature = "gpu")]
            Backend::Gpu(g) => g.device_bytes(),
        }
    }
}

pub(crate) fn check_len(what: &str, actual: usize, expected: usize) -> Result<()> {
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
                t.decode_row_tile(&self.dtable, rt, q)?;
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

#[cfg(feature = "gpu")]
mod gpu {
    use super::Strategy;
    use crate::error::Result;
    use crate::format::EcTensor;
    use crate::gpu::kernels::{self, GpuPacked, GpuScales, GpuStream, MAX_VECTORS_PER_PASS};
    use crate::gpu::{GpuContext, HostIo, HostSlot, Kernel, MslGemv, PerCount};

    /// The GPU side of [`super::EcMatmul`]: what each strategy holds on the device.
    pub(super) struct GpuMatmul {
        ctx: GpuContext,
        pub strategy: Strategy,
        pub rows: usize,
        pub cols: usize,
        /// Fused: the compressed stream.
        stream: Option<GpuStream>,
        /// Cached: the packed symbols, decoded once at load.
        packed: Option<GpuPacked>,
        scales: GpuScales,
        /// Group 0 of ec_gemv (Fused) or q_gemv (Cached); None where the Metal kernel, which binds its own, takes the
        /// fused products.
        weights: Option<wgpu::BindGroup>,
        /// Fused on a context whose fused kernel is the MSL one: that kernel, for up to 8 vectors.
        msl: Option<MslGemv>,
        /// The q_gemv call uniform per vector count.
        calls: PerCount,
        /// Bits per symbol, and q_gemv's room for the vectors in lane order per vector count.
        bits: u32,
        lanes: PerCount,
        /// Staging for host-slice calls, per vector count.
        host: HostSlot,
    }

    impl GpuMatmul {
        pub fn new(ctx: &GpuContext, tensor: &EcTensor, strategy: Strategy) -> Result<Self> {
            let stream = GpuStream::upload(ctx, tensor)?;
            let fused = strategy == Strategy::Fused;
            let on_msl = fused && ctx.fused_uses_msl();
            // ec_gemv.wgsl reads the scales in tile order; q_gemv and the Metal kernel row-major.
            let scales =
                if fused && !on_msl { GpuScales::upload_tiles(ctx, tensor)? } else { GpuScales::upload(ctx, tensor)? };
            let msl = if on_msl { Some(MslGemv::new(ctx, tensor, &stream, &scales)?) } else { None };
            let (stream, packed, weights) = if strategy == Strategy::Cached {
                let packed = kernels::decode_to_packed(ctx, &stream)?;
                let weights = kernels::q_gemv_weights(ctx, &packed, &scales)?;
                (None, Some(packed), Some(weights))
            } else if msl.is_some() {
                (Some(stream), None, None)
            } else {
                let weights = kernels::ec_gemv_weights(ctx, &stream, &scales)?;
                (Some(stream), None, Some(weights))
            };
            Ok(Self {
                ctx: ctx.clone(),
                strategy,
                rows: tensor.rows(),
                cols: tensor.cols(),
                stream,
                packed,
                scales,
                weights,
                msl,
                calls: PerCount::default(),
                bits: tensor.bits(),
                lanes: PerCount::default(),
                host: HostSlot::default(),
            })
        }

        pub fn device_bytes(&self) -> u64 {
            self.stream.as_ref().map_or(0, |s| s.device_bytes() + kernels::seam_bytes(&self.ctx, s))
                + self.packed.as_ref().map_or(0, |p| p.device_bytes())
                + self.scales.device_bytes()
                + self.msl.as_ref().map_or(0, |m| m.device_bytes())
        }

        /// The kernel whose group 1 the vectors bind to: ec_gemv for up to 8 vectors on the fused path,
        /// q_gemv otherwise.
        fn io_kernel(&self, m: usize) -> Kernel {
            if self.stream.is_some() && m <= MAX_VECTORS_PER_PASS {
                Kernel::EcGemv
            } else {
                Kernel::QGemv
            }
        }

        fn io_group(&self, x: &wgpu::Buffer, y: &wgpu::Buffer, m: usize) -> Result<wgpu::BindGroup> {
            let kernel = self.io_kernel(m);
            if let (Kernel::EcGemv, Some(msl)) = (kernel, &self.msl) {
                return msl.io_group(&self.ctx, x, y, m);
            }
            if kernel == Kernel::EcGemv {
                return Ok(kernels::io_bind_group(&self.ctx, kernel, x, y, None, None));
            }
            let call = self.calls.get(m, || kernels::call_params(&self.ctx, m))?;
            let xl = if kernels::lane_x(self.bits, self.rows, self.cols, m) {
                Some(self.lanes.get(m, || kernels::lane_x_room(&self.ctx, m, self.cols))?)
            } else {
                None
            };
            Ok(kernels::io_bind_group(&self.ctx, kernel, x, y, Some(&call), xl.as_ref()))
        }

        /// Group 0 of ec_gemv or q_gemv, held wherever the Metal kernel does not take the product.
        fn own_weights(&self) -> &wgpu::BindGroup {
            self.weights.as_ref().unwrap_or_else(|| unreachable!("a product not on the Metal kernel holds its group 0"))
        }

        fn record(&self, pass: &mut wgpu::ComputePass<'_>, io: &wgpu::BindGroup, m: usize) -> Result<()> {
            match (&self.stream, &self.packed) {
                (Some(stream), _) if m <= MAX_VECTORS_PER_PASS => match &self.msl {
                    Some(msl) => msl.record(&self.ctx, pass, io, m),
                    None => kernels::ec_gemv(&self.ctx, pass, stream, self.own_weights(), io, m),
                },
                (Some(stream), _) => {
                    // Many vectors: decode once into scratch packed symbols (and the scales row-major, where they are
                    // in tile order), then the tiled quantized matmul (wgpu places the barriers between the
                    // dispatches).
                    let scratch = GpuPacked::for_stream(&self.ctx, stream)?;
                    let status = self.ctx.storage("decode status", 8, wgpu::BufferUsages::empty())?;
                    kernels::rans_decode(&self.ctx, pass, stream, &scratch, &status)?;
                    let scales = self.scales.to_rows(&self.ctx, pass)?;
                    let weights = kernels::q_gemv_weights(&self.ctx, &scratch, &scales)?;
                    kernels::q_gemv(&self.ctx, pass, &scratch, &weights, io, m)
                }
                (None, Some(packed)) => kernels::q_gemv(&self.ctx, pass, packed, self.own_weights(), io, m),
                (None, None) => unreachable!("a GPU product holds a stream or packed symbols"),
            }
        }

        pub fn encode_pass(
            &self,
            pass: &mut wgpu::ComputePass<'_>,
            x: &wgpu::Buffer,
            y: &wgpu::Buffer,
            m: usize,
        ) -> Result<()> {
            crate::gpu::check_buffers(x, y, m, self.cols, self.rows)?;
            if m == 0 {
                return Ok(());
            }
            let io = self.io_group(x, y, m)?;
            self.record(pass, &io, m)
        }

        /// Runs `f` on the host staging for `m` vectors.
        fn with_host<T>(&self, m: usize, f: impl FnOnce(&HostIo) -> Result<T>) -> Result<T> {
            self.host.with(&self.ctx, (m, self.cols, self.rows), |x, y| self.io_group(x, y, m), f)
        }

        pub fn device_times(&self, m: usize, runs: usize) -> Result<Vec<std::time::Duration>> {
            if m == 0 {
                return Err(crate::Error::param("m", "time at least one vector"));
            }
            self.with_host(m, |io| {
                crate::gpu::time_passes_on_device(&self.ctx, runs, |pass| self.record(pass, &io.group, m))
            })
        }

        pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
            if m == 0 || self.rows == 0 {
                return Ok(());
            }
            self.with_host(m, |io| io.run(&self.ctx, x, y, |pass, group| self.record(pass, group, m)))
        }
    }
}
