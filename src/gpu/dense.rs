//! [`DenseGemv`]: the dense baseline every figure is compared to.

use super::context::GpuContext;
use super::kernels;
use super::shaders::Kernel;
use super::{HostIo, HostSlot, PerCount};
use crate::error::{Error, Result};
use crate::matmul::check_len;

/// Storage type of a dense weight on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenseDtype {
    /// 32-bit float (gemv_f32.wgsl).
    F32,
    /// Half precision (gemv_f16.wgsl); `cols` must be even.
    F16,
}

/// `y = W x` with a dense `rows x cols` weight held on the device.
pub struct DenseGemv {
    ctx: GpuContext,
    rows: usize,
    cols: usize,
    dtype: DenseDtype,
    kernel: Kernel,
    params: wgpu::Buffer,
    weights: wgpu::Buffer,
    group: wgpu::BindGroup,
    /// The call uniform per vector count.
    calls: PerCount,
    host: HostSlot,
}

impl DenseGemv {
    /// Uploads `weights` (row-major `rows x cols`), rounded to `dtype`.
    pub fn new(ctx: &GpuContext, weights: &[f32], rows: usize, cols: usize, dtype: DenseDtype) -> Result<Self> {
        if weights.len() != rows * cols {
            return Err(Error::ShapeMismatch { what: "weights".into(), expected: rows * cols, actual: weights.len() });
        }
        let none = wgpu::BufferUsages::empty();
        let (kernel, buffer) = match dtype {
            // Padded to 16 bytes: the kernels read the weights as 16-byte vectors.
            DenseDtype::F32 => {
                (Kernel::GemvF32, ctx.storage_init("dense f32", &padded16(bytemuck::cast_slice(weights)), none)?)
            }
            DenseDtype::F16 => {
                if cols % 2 != 0 {
                    return Err(Error::param("cols", format!("f16 weights need an even column count, got {cols}")));
                }
                let half: Vec<half::f16> = weights.iter().map(|&w| half::f16::from_f32(w)).collect();
                (Kernel::GemvF16, ctx.storage_init("dense f16", &padded16(bytemuck::cast_slice(&half)), none)?)
            }
        };
        let params = ctx.uniform("ecq dense params", &[rows as u32, cols as u32, 0, 0])?;
        let group = kernels::bind_group(ctx, kernel, 0, &[&params, &buffer]);
        Ok(Self {
            ctx: ctx.clone(),
            rows,
            cols,
            dtype,
            kernel,
            params,
            weights: buffer,
            group,
            calls: PerCount::default(),
            host: HostSlot::default(),
        })
    }

    /// Records `y = W x` for `m` vectors in a compute pass of its own: `x` holds `m x cols` f32, `y` `m x rows`
    /// f32 (both storage buffers).
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<()> {
        self.encode_pass(&mut encoder.begin_compute_pass(&Default::default()), x, y, m)
    }

    /// [`encode`](Self::encode) into a compute pass the caller began (see [`crate::EcMatmul::encode_pass`]).
    pub fn encode_pass(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        m: usize,
    ) -> Result<()> {
        check_buffers(x, y, m, self.cols, self.rows)?;
        let call = self.calls.get(m, || kernels::call_params(&self.ctx, m))?;
        let io = kernels::io_bind_group(&self.ctx, self.kernel, x, y, Some(&call), None);
        self.record(pass, &io, m)
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>, io: &wgpu::BindGroup, m: usize) -> Result<()> {
        kernels::gemv_dense(&self.ctx, pass, self.dtype, (self.rows, self.cols), &self.group, io, m)
    }

    /// `Y = X W^T` for `m` host vectors: `x` row-major `m x cols`, `y` row-major `m x rows`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        check_len("x", x.len(), m * self.cols)?;
        check_len("y", y.len(), m * self.rows)?;
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        self.with_host(m, |io| io.run(&self.ctx, x, y, |pass, group| self.record(pass, group, m)))
    }

    /// Runs `f` on the host staging for `m` vectors.
    fn with_host<T>(&self, m: usize, f: impl FnOnce(&HostIo) -> Result<T>) -> Result<T> {
        let group = |x: &wgpu::Buffer, y: &wgpu::Buffer| {
            let call = self.calls.get(m, || kernels::call_params(&self.ctx, m))?;
            Ok(kernels::io_bind_group(&self.ctx, self.kernel, x, y, Some(&call), None))
        };
        self.host.with(&self.ctx, (m, self.cols, self.rows), group, f)
    }

    /// Device time of `runs` back-to-back products of `m` vectors, each in a compute pass of its own, measured
    /// with the pass's timestamps (see [`time_passes_on_device`](super::time_passes_on_device)).
    pub fn device_times(&self, m: usize, runs: usize) -> Result<Vec<std::time::Duration>> {
        if m == 0 {
            return Err(Error::param("m", "time at least one vector"));
        }
        self.with_host(m, |io| super::time_passes_on_device(&self.ctx, runs, |pass| self.record(pass, &io.group, m)))
    }

    /// Bytes of weights held on the device.
    pub fn device_bytes(&self) -> u64 {
        self.weights.size() + self.params.size()
    }

    /// The group-0 bind group (parameters and weights) in the layout of the dtype's kernel, for dispatching
    /// another pipeline built on that layout (as [`super::kernels::edited_pipeline`] builds them).
    pub fn weights_bind_group(&self) -> &wgpu::BindGroup {
        &self.group
    }
}

/// `bytes` followed by zeros up to a multiple of 16.
fn padded16(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(bytes.len().next_multiple_of(16), 0);
    v
}

/// Checks that device buffers hold `m` vectors in and out.
pub(crate) fn check_buffers(x: &wgpu::Buffer, y: &wgpu::Buffer, m: usize, cols: usize, rows: usize) -> Result<()> {
    for (what, buffer, need) in [("x buffer", x, m * cols * 4), ("y buffer", y, m * rows * 4)] {
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::param("buffer", format!("the {what} needs BufferUsages::STORAGE")));
        }
        if (buffer.size() as usize) < need {
            return Err(Error::ShapeMismatch {
                what: format!("{what} bytes"),
                expected: need,
                actual: buffer.size() as usize,
            });
        }
    }
    Ok(())
}
