//! The GPU path through wgpu: a device context, the WGSL kernels and one host function per kernel.
//!
//! - [`GpuContext`] opens an adapter (or wraps a device the caller opened) and caches pipelines.
//! - [`kernels`] holds the device-side arrays ([`GpuStream`], [`GpuPacked`], [`GpuScales`]) and one host
//!   function per kernel, each recording into a caller's `wgpu::ComputePass`.
//! - [`DenseGemv`] is the dense f32 / f16 baseline.
//! - [`time_on_device`] and [`time_passes_on_device`] time recorded work with timestamp queries.
//! - [`shaders`] holds every WGSL source, loaded from `wgsl/` in one place.
//!
//! On Metal, fused products of up to 8 vectors run the hand-written MSL kernel (`msl/ec_gemv.metal`) through
//! wgpu's passthrough shaders, unless [`FusedSource::Wgsl`] is asked for ([`GpuContext::with_fused_source`],
//! or `ECQ_FORCE_WGSL=1`); every other kernel, and every other backend, runs WGSL.
//!
//! Most callers want [`crate::EcMatmul::new`] with a context from [`GpuContext::new`].
//!
//! Kernel paths. Each kernel comes in a portable variant (workgroup memory only) and a subgroup variant;
//! [`GpuContext::with_path`] picks one, so tests run both on any device. The subgroup variant for subgroups of
//! 32 lanes or more assumes full subgroups numbered in order (`subgroup_id * subgroup_size +
//! subgroup_invocation_id` covers the workgroup), as on NVIDIA, AMD and Apple GPUs; narrower subgroups (Intel,
//! lavapipe) use per-subgroup ballots and exchange counts through workgroup memory.
//!
//! Where the driver reports its compute units ([`GpuContext::compute_units`]: NVIDIA's SMs on Vulkan), the fused
//! kernel's specialization depends on them too ([`kernels::ec_gemv_spec`]): [`kernels::vector_groups`] shares a
//! product's vectors out over more workgroups, [`kernels::row_tile_pairs`] gives each workgroup two row tiles where
//! that spreads them more evenly over the compute units, [`kernels::spread_slabs`] deals the row-tile segments of up
//! to [`kernels::SPREAD_VECTORS`] vectors out over the workgroups in runs where whole row tiles would leave some units
//! more than others, and [`kernels::stage_x`] and [`kernels::early_x`] hold x nearer the decode steps where every
//! workgroup has a compute unit to itself. The products are the same, bit for bit, but for the rows of a row tile
//! dealt out across two workgroups, whose two parts are added in another order. Where the device also runs dot
//! products of packed 8-bit integers as one instruction ([`GpuContext::integer_dot`]), a staged vector is held as 8-bit
//! digits ([`kernels::integer_dot`]), and [`kernels::task_blocks`] deals the segments of split streams' products of up
//! to [`kernels::SPREAD_VECTORS`] vectors out in blocks of row tiles by segments, each workgroup staging its part of
//! every vector as digits; those products take x rounded to 23 significant bits at the largest magnitude of each loop
//! trip's columns. Whatever the compute units, each slab of a product that reads x in 16-byte pieces holds its loop
//! trip's x in workgroup memory where that fits ([`kernels::slab_x`]), with the same products.
//!
//! Limits wgpu does not check are checked here: each kernel's workgroup memory against
//! `max_compute_workgroup_storage_size`, and every array against the storage binding limit (larger tensors
//! are refused with [`crate::Error::Gpu`]; split them along their rows).
//!
//! Parity tests: `XDG_RUNTIME_DIR=/tmp ECQ_REQUIRE_GPU=1 cargo test --release --test gpu_parity` (lavapipe
//! works: `apt-get install mesa-vulkan-drivers`).

mod context;
mod dense;
pub mod kernels;
mod metal;
pub mod shaders;
mod timing;

pub use context::{GpuContext, KernelPath};
pub use dense::{DenseDtype, DenseGemv};
pub use kernels::{GpuPacked, GpuScales, GpuStream};
pub use metal::{FusedSource, FORCE_WGSL_ENV};
pub use shaders::{Kernel, LaneMode};
pub use timing::{time_on_device, time_passes_on_device};

/// Host-side staging for calls that take host slices: an input and an output buffer for `m` vectors, and the
/// group-1 bind group over them, kept between calls with the same `m`.
pub(crate) struct HostIo {
    pub m: usize,
    pub x: wgpu::Buffer,
    pub y: wgpu::Buffer,
    pub group: wgpu::BindGroup,
}

impl HostIo {
    /// Buffers for `m` vectors of `cols` in and `rows` out; `group` builds the bind group over them.
    pub fn new(
        ctx: &GpuContext,
        m: usize,
        cols: usize,
        rows: usize,
        group: impl FnOnce(&wgpu::Buffer, &wgpu::Buffer) -> crate::Result<wgpu::BindGroup>,
    ) -> crate::Result<Self> {
        let x = ctx.storage("x", (m * cols * 4) as u64, wgpu::BufferUsages::empty())?;
        let y = ctx.storage("y", (m * rows * 4) as u64, wgpu::BufferUsages::COPY_SRC)?;
        let group = group(&x, &y)?;
        Ok(Self { m, x, y, group })
    }

    /// One call on host slices: uploads `x`, poisons the output with NaN (so an element a kernel fails to write
    /// reads back as NaN), records the product with `record` into one compute pass over this staging's bind
    /// group, submits, waits and copies `y.len()` outputs back.
    pub fn run(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        y: &mut [f32],
        record: impl FnOnce(&mut wgpu::ComputePass<'_>, &wgpu::BindGroup) -> crate::Result<()>,
    ) -> crate::Result<()> {
        ctx.queue().write_buffer(&self.x, 0, bytemuck::cast_slice(x));
        ctx.queue().write_buffer(&self.y, 0, bytemuck::cast_slice(&vec![f32::NAN; y.len()]));
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        record(&mut encoder.begin_compute_pass(&Default::default()), &self.group)?;
        ctx.submit_and_wait(encoder)?;
        let data = ctx.read_back(&self.y, (y.len() * 4) as u64)?;
        y.copy_from_slice(bytemuck::cast_slice(&data));
        Ok(())
    }
}

/// A buffer per vector count, built on first use and kept, so recording a product allocates none: the row
/// kernels' call uniform ([`kernels::call_params`]), q_gemv's room for x in lane order ([`kernels::lane_x_room`]).
#[derive(Default)]
pub(crate) struct PerCount(std::sync::Mutex<std::collections::HashMap<usize, wgpu::Buffer>>);

impl PerCount {
    /// The buffer for `m` vectors, from `make` the first time.
    pub fn get(&self, m: usize, make: impl FnOnce() -> crate::Result<wgpu::Buffer>) -> crate::Result<wgpu::Buffer> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = held.get(&m) {
            return Ok(b.clone());
        }
        let b = make()?;
        held.insert(m, b.clone());
        Ok(b)
    }
}

/// The host staging of one product, kept between calls and rebuilt when the vector count changes.
#[derive(Default)]
pub(crate) struct HostSlot(std::sync::Mutex<Option<HostIo>>);

impl HostSlot {
    /// Runs `f` on the staging for `m` vectors of `cols` in and `rows` out, building it first (with `group`
    /// making its bind group) unless the last call had the same `m`.
    pub fn with<T>(
        &self,
        ctx: &GpuContext,
        (m, cols, rows): (usize, usize, usize),
        group: impl FnOnce(&wgpu::Buffer, &wgpu::Buffer) -> crate::Result<wgpu::BindGroup>,
        f: impl FnOnce(&HostIo) -> crate::Result<T>,
    ) -> crate::Result<T> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|h| h.m != m) {
            *slot = Some(HostIo::new(ctx, m, cols, rows, group)?);
        }
        f(slot.as_ref().expect("set above"))
    }
}

pub(crate) use dense::check_buffers;
pub(crate) use metal::MslGemv;
