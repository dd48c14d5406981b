//! The Metal native path of [`crate::Strategy::Fused`]: `msl/ec_gemv.metal` ([`crate::kernels_msl::EC_GEMV`])
//! loaded through `wgpu::Features::PASSTHROUGH_SHADERS` and `Device::create_shader_module_passthrough`.
//!
//! Selection happens at run time by backend, so this file compiles everywhere: a context uses the MSL kernel
//! for fused products of up to 8 vectors when its adapter's backend is Metal and the device has
//! `PASSTHROUGH_SHADERS` (requested by [`GpuContext::new`] on Metal adapters), unless [`FusedSource::Wgsl`]
//! was asked for ([`GpuContext::with_fused_source`], or `ECQ_FORCE_WGSL=1` for new contexts). Every other
//! backend, and products of more than 8 vectors, use the WGSL kernels.
//!
//! Binding: two bind groups in the order of [`EC_GEMV_GROUPS`] (weights, then the call's `x`, `y`,
//! `tile_status` and `params`), every entry listed in binding order; wgpu's Metal backend gives them buffer
//! indices 0, 1, ... in that order, which is the kernel's `[[buffer(n)]]` numbering. wgpu passes no buffer
//! lengths to passthrough shaders, so every size travels in the [`EcParams`] uniform.
//!
//! Corrupt input: the kernel clamps every index it takes from the stream (no access leaves its buffer) and
//! writes each tile's check into `tile_status`. The stream is immutable once uploaded, so the product runs the
//! kernel once at load and refuses a stream with a failing tile ([`crate::Error::CorruptStream`], lowest
//! tile), as the cached path's load-time decode does; later calls do not read `tile_status` back.
//!
//! No Apple hardware has run this path: the MSL is checked by the C++ emulation harness (tests/msl_emu.rs)
//! and this file by `cargo check --target aarch64-apple-darwin` and the unit tests below.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::context::GpuContext;
use super::kernels::{GpuScales, GpuStream, ScaleOrder};
use crate::error::{Error, Result};
use crate::format::EcTensor;
use crate::kernels_msl::{
    ec_gemv_entry_point, ec_gemv_entry_points, ec_gemv_threadgroup_bytes, BufferAccess, EcParams, EC_GEMV,
    EC_GEMV_GROUPS, EC_GEMV_MAX_VECTORS, THREADS_PER_THREADGROUP,
};

/// Environment variable that makes contexts opened while it is `1` build the WGSL fused kernel on Metal too.
pub const FORCE_WGSL_ENV: &str = "ECQ_FORCE_WGSL";

/// Which source [`crate::Strategy::Fused`] products are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum FusedSource {
    /// The hand-written MSL kernel where the device runs it (Metal backend with `PASSTHROUGH_SHADERS`), WGSL
    /// elsewhere. A context opened with `ECQ_FORCE_WGSL=1` starts at [`FusedSource::Wgsl`] instead.
    #[default]
    Auto,
    /// The WGSL kernel on every backend (naga translates it to MSL on Metal).
    Wgsl,
    /// The MSL kernel; asking for it on a device without it fails.
    Msl,
}

impl FusedSource {
    /// The source a new context starts with, given the value of `ECQ_FORCE_WGSL`.
    pub(crate) fn from_env_value(value: Option<&str>) -> Self {
        if value.map(str::trim) == Some("1") {
            FusedSource::Wgsl
        } else {
            FusedSource::Auto
        }
    }

    /// The source a new context starts with, from the environment.
    pub(crate) fn from_env() -> Self {
        Self::from_env_value(std::env::var(FORCE_WGSL_ENV).ok().as_deref())
    }
}

/// Whether a device runs the MSL kernels: the Metal backend with `PASSTHROUGH_SHADERS`.
pub(crate) fn msl_available(backend: wgpu::Backend, features: wgpu::Features) -> bool {
    backend == wgpu::Backend::Metal && features.contains(wgpu::Features::PASSTHROUGH_SHADERS)
}

/// Features requested beyond the kernels' usual set on an adapter of `backend`: `PASSTHROUGH_SHADERS` on
/// Metal only (other backends would not use it).
pub(crate) fn wanted_features(backend: wgpu::Backend) -> wgpu::Features {
    if backend == wgpu::Backend::Metal {
        wgpu::Features::PASSTHROUGH_SHADERS
    } else {
        wgpu::Features::empty()
    }
}

/// Whether fused products use the MSL kernel for `requested` on a device of `backend` with `features`;
/// `Err` (a message) for [`FusedSource::Msl`] where the device cannot run it.
pub(crate) fn use_msl(
    requested: FusedSource,
    backend: wgpu::Backend,
    features: wgpu::Features,
) -> std::result::Result<bool, String> {
    let available = msl_available(backend, features);
    match requested {
        FusedSource::Auto => Ok(available),
        FusedSource::Wgsl => Ok(false),
        FusedSource::Msl if available => Ok(true),
        FusedSource::Msl => Err(format!(
            "the MSL fused kernel needs the Metal backend with Features::PASSTHROUGH_SHADERS (backend {backend:?}, \
             feature present: {}); use FusedSource::Auto or Wgsl",
            features.contains(wgpu::Features::PASSTHROUGH_SHADERS)
        )),
    }
}

/// The bind group layout entries of group `group` of [`EC_GEMV_GROUPS`], in binding order.
pub(crate) fn layout_entries(group: usize) -> Vec<wgpu::BindGroupLayoutEntry> {
    EC_GEMV_GROUPS[group]
        .iter()
        .enumerate()
        .map(|(i, &(_, access))| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match access {
                    BufferAccess::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    BufferAccess::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    BufferAccess::Uniform => wgpu::BufferBindingType::Uniform,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect()
}

/// What a context caches for the MSL kernels: the library (all entry points), the two bind group layouts
/// and one pipeline per entry point.
#[derive(Default)]
pub(crate) struct MslCache {
    module: Mutex<Option<wgpu::ShaderModule>>,
    layouts: Mutex<Option<Arc<[wgpu::BindGroupLayout; 2]>>>,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
}

fn layouts(ctx: &GpuContext) -> Arc<[wgpu::BindGroupLayout; 2]> {
    let mut cached = ctx.msl_cache().layouts.lock().unwrap_or_else(|e| e.into_inner());
    cached
        .get_or_insert_with(|| {
            Arc::new([0, 1].map(|group| {
                ctx.device().create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("ec_gemv.metal"),
                    entries: &layout_entries(group),
                })
            }))
        })
        .clone()
}

/// The library of [`EC_GEMV`] with every entry point at 256 threads per threadgroup, compiled on first use.
fn module(ctx: &GpuContext) -> Result<wgpu::ShaderModule> {
    let mut cached = ctx.msl_cache().module.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = cached.as_ref() {
        return Ok(m.clone());
    }
    let entry_points: Vec<wgpu::PassthroughShaderEntryPoint> = ec_gemv_entry_points()
        .into_iter()
        .map(|name| wgpu::PassthroughShaderEntryPoint {
            name: name.into(),
            workgroup_size: (THREADS_PER_THREADGROUP, 1, 1),
        })
        .collect();
    let scope = ctx.device().push_error_scope(wgpu::ErrorFilter::Validation);
    // SAFETY: the source is the crate's own MSL library, whose entry points, threadgroup size and buffer
    // indices are the ones declared here and in `layout_entries` (tests/msl_source.rs checks them against the
    // source); its kernels bound every index they take from buffer contents by the sizes in `EcParams`, which
    // the host fills from the same tensor whose buffers it binds.
    let module = unsafe {
        ctx.device().create_shader_module_passthrough(wgpu::ShaderModuleDescriptorPassthrough {
            label: Some("ec_gemv.metal"),
            entry_points: entry_points.into(),
            msl: Some(EC_GEMV.into()),
            ..Default::default()
        })
    };
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::Gpu(format!("the Metal compiler refused msl/ec_gemv.metal: {e}; set ECQ_FORCE_WGSL=1")));
    }
    *cached = Some(module.clone());
    Ok(module)
}

/// The pipeline of the `ec_gemv` variant for `bits`, `vectors` vectors, a stream of precision `precision` and
/// split or not, built on first use.
fn pipeline(ctx: &GpuContext, bits: u32, vectors: u32, precision: u32, split: bool) -> Result<wgpu::ComputePipeline> {
    let entry = ec_gemv_entry_point(bits, vectors, precision, split);
    let bytes = ec_gemv_threadgroup_bytes(vectors, precision);
    let limit = ctx.limits().max_compute_workgroup_storage_size as u64;
    if bytes > limit {
        return Err(Error::Gpu(format!(
            "{entry} needs {bytes} bytes of threadgroup memory, the device allows {limit}; set ECQ_FORCE_WGSL=1"
        )));
    }
    let limit = ctx.limits().max_compute_invocations_per_workgroup;
    if THREADS_PER_THREADGROUP > limit {
        return Err(Error::Gpu(format!(
            "{entry} needs {THREADS_PER_THREADGROUP} threads per threadgroup, the device allows {limit}"
        )));
    }
    let mut cache = ctx.msl_cache().pipelines.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&entry) {
        return Ok(p.clone());
    }
    let module = module(ctx)?;
    let layouts = layouts(ctx);
    let device = ctx.device();
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("ec_gemv.metal"),
        bind_group_layouts: &[Some(&layouts[0]), Some(&layouts[1])],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&entry),
        layout: Some(&layout),
        module: &module,
        entry_point: Some(&entry),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::Gpu(format!("building {entry} of msl/ec_gemv.metal failed: {e}; set ECQ_FORCE_WGSL=1")));
    }
    cache.insert(entry, pipeline.clone());
    Ok(pipeline)
}

/// A fused product's MSL side: the weight's bind group, the per-tile status and one `EcParams` uniform per
/// vector count.
pub(crate) struct MslGemv {
    bits: u32,
    split: bool,
    row_tiles: usize,
    tiles: usize,
    base: EcParams,
    weights: wgpu::BindGroup,
    tile_status: wgpu::Buffer,
    params: Mutex<HashMap<u32, wgpu::Buffer>>,
}

impl MslGemv {
    /// The MSL side of a fused product of `tensor`, whose stream and scales (row-major: [`GpuScales::upload`]) are
    /// already on the device; runs the kernel once and refuses a stream with a failing tile.
    pub fn new(ctx: &GpuContext, tensor: &EcTensor, stream: &GpuStream, scales: &GpuScales) -> Result<Self> {
        if scales.order() != ScaleOrder::Rows {
            return Err(Error::param("scales", "msl/ec_gemv.metal reads scales row-major: GpuScales::upload"));
        }
        let l = tensor.layout();
        let base = EcParams::new(tensor, 1)?;
        check_params(&base)?;
        let [words, tile_offsets, states, decode_table, low] = stream.msl_buffers();
        let [scales, biases] = scales.msl_buffers();
        let weights = bind_group(ctx, 0, &[words, tile_offsets, states, decode_table, scales, biases, low]);
        let tile_status = ctx.storage("tile status", (l.tiles() * 4) as u64, wgpu::BufferUsages::COPY_SRC)?;
        let gemv = Self {
            bits: l.bits(),
            split: stream.split(),
            row_tiles: l.row_tiles(),
            tiles: l.tiles(),
            base,
            weights,
            tile_status,
            params: Mutex::new(HashMap::new()),
        };
        gemv.check_stream(ctx, l.rows(), l.cols())?;
        Ok(gemv)
    }

    /// Bytes held on the device beyond the stream and scales.
    pub fn device_bytes(&self) -> u64 {
        self.tile_status.size()
    }

    /// The group-1 bind group of a call: `x` (`m x cols` f32), `y` (`m x rows` f32), the tile status and the
    /// `EcParams` of `m` vectors (1..=8).
    pub fn io_group(&self, ctx: &GpuContext, x: &wgpu::Buffer, y: &wgpu::Buffer, m: usize) -> Result<wgpu::BindGroup> {
        let m = vectors(m)?;
        let mut params = self.params.lock().unwrap_or_else(|e| e.into_inner());
        let p = match params.get(&m) {
            Some(p) => p.clone(),
            None => {
                let block = EcParams { vectors: m, ..self.base };
                let p = ctx.uniform("ecq msl params", bytemuck::cast_slice(bytemuck::bytes_of(&block)))?;
                params.insert(m, p.clone());
                p
            }
        };
        Ok(bind_group(ctx, 1, &[x, y, &self.tile_status, &p]))
    }

    /// Records the product of `m` (1..=8) vectors into `pass`; `io` from [`io_group`](Self::io_group) for the
    /// same `m`.
    /// Grid: one threadgroup of 256 threads per row tile.
    pub fn record(
        &self,
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'_>,
        io: &wgpu::BindGroup,
        m: usize,
    ) -> Result<()> {
        let m = vectors(m)?;
        let pipeline = pipeline(ctx, self.bits, m, self.base.precision, self.split)?;
        if self.row_tiles == 0 {
            return Ok(());
        }
        let limit = ctx.limits().max_compute_workgroups_per_dimension as usize;
        if self.row_tiles > limit {
            return Err(Error::Gpu(format!(
                "{} row tiles need as many threadgroups, above the device's {limit}; split the tensor along its \
                 rows or set ECQ_FORCE_WGSL=1",
                self.row_tiles
            )));
        }
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &self.weights, &[]);
        pass.set_bind_group(1, io, &[]);
        pass.dispatch_workgroups(self.row_tiles as u32, 1, 1);
        Ok(())
    }

    /// Runs the kernel once on a zero vector and reads every tile's status back: the load-time check.
    fn check_stream(&self, ctx: &GpuContext, rows: usize, cols: usize) -> Result<()> {
        if self.tiles == 0 {
            return Ok(());
        }
        let x = ctx.storage_init("x", &vec![0u8; cols * 4], wgpu::BufferUsages::empty())?;
        let y = ctx.storage("y", (rows * 4) as u64, wgpu::BufferUsages::empty())?;
        let io = self.io_group(ctx, &x, &y, 1)?;
        // Every status starts as all ones (failed), so a tile the kernel skips, or a whole threadgroup that
        // leaves on a parameter check, reads as failed; 0, its "ok", only where the kernel wrote it.
        ctx.queue().write_buffer(&self.tile_status, 0, &vec![0xff; self.tiles * 4]);
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        self.record(ctx, &mut encoder.begin_compute_pass(&Default::default()), &io, 1)?;
        ctx.submit_and_wait(encoder)?;
        let status: Vec<u32> =
            bytemuck::pod_collect_to_vec(&ctx.read_back(&self.tile_status, (self.tiles * 4) as u64)?);
        first_failed_tile(&status)
    }
}

/// `Err(CorruptStream)` naming the lowest tile whose status is not 0.
fn first_failed_tile(status: &[u32]) -> Result<()> {
    let failed = status.iter().filter(|&&s| s != 0).count();
    match status.iter().position(|&s| s != 0) {
        None => Ok(()),
        Some(tile) => Err(Error::CorruptStream {
            tile,
            reason: format!(
                "{failed} tile check(s) failed in the MSL kernel (status {:#x}: bit 0 end states, bit 1 word count)",
                status[tile]
            ),
        }),
    }
}

/// The conditions under which the kernel leaves without writing (see the top of msl/ec_gemv.metal), checked
/// on the host so a product never silently skips its work.
fn check_params(p: &EcParams) -> Result<()> {
    // Columns one trip of the kernel's step loop covers: a joint symbol, or a split stream's block (16 or 32).
    let form = crate::rans::SplitForm::from_low_bits(p.low_bits);
    let step_cols = form.map_or(8 / p.bits.max(1), |f| f.block() as u32);
    let split_ok = p.low_bits == 0 || form.is_some_and(|f| f.coded_bits() == p.bits);
    let fits = (1..=8).contains(&p.bits)
        && split_ok
        && p.group_size != 0
        && p.group_size % step_cols == 0
        && p.segment != 0
        && p.segment % p.group_size == 0
        && p.cols % p.group_size == 0
        && p.precision <= crate::rans::MAX_PRECISION;
    if !fits {
        return Err(Error::param("shape", format!("the MSL fused kernel does not take {p:?}; set ECQ_FORCE_WGSL=1")));
    }
    Ok(())
}

/// `m` as the kernel's vector count, 1..=8.
fn vectors(m: usize) -> Result<u32> {
    if !(1..=EC_GEMV_MAX_VECTORS as usize).contains(&m) {
        return Err(Error::param(
            "m",
            format!("the MSL fused kernel takes 1..={EC_GEMV_MAX_VECTORS} vectors, got {m}"),
        ));
    }
    Ok(m as u32)
}

/// A bind group of whole `buffers`, in binding order, for group `group`.
fn bind_group(ctx: &GpuContext, group: usize, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
    super::kernels::whole_buffers(ctx, "ec_gemv.metal", &layouts(ctx)[group], buffers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::{Backend, Features};

    /// Metal with the feature selects MSL; every other backend, the missing feature, or a forced WGSL source
    /// selects WGSL; asking for MSL where it cannot run is an error.
    #[test]
    fn selection_follows_backend_feature_and_request() {
        let pass = Features::PASSTHROUGH_SHADERS;
        let none = Features::empty();
        assert_eq!(use_msl(FusedSource::Auto, Backend::Metal, pass), Ok(true));
        assert_eq!(use_msl(FusedSource::Msl, Backend::Metal, pass | Features::SUBGROUP), Ok(true));
        assert_eq!(use_msl(FusedSource::Auto, Backend::Metal, none), Ok(false));
        assert_eq!(use_msl(FusedSource::Wgsl, Backend::Metal, pass), Ok(false));
        for backend in [Backend::Vulkan, Backend::Dx12, Backend::Gl, Backend::Noop] {
            assert_eq!(use_msl(FusedSource::Auto, backend, pass), Ok(false), "{backend:?}");
            assert_eq!(use_msl(FusedSource::Wgsl, backend, pass), Ok(false), "{backend:?}");
            assert!(use_msl(FusedSource::Msl, backend, pass).is_err(), "{backend:?}");
        }
        assert!(use_msl(FusedSource::Msl, Backend::Metal, none).is_err());
    }

    #[test]
    fn passthrough_is_requested_on_metal_only() {
        assert_eq!(wanted_features(Backend::Metal), Features::PASSTHROUGH_SHADERS);
        for backend in [Backend::Vulkan, Backend::Dx12, Backend::Gl] {
            assert_eq!(wanted_features(backend), Features::empty(), "{backend:?}");
        }
    }

    #[test]
    fn force_wgsl_env_value() {
        assert_eq!(FusedSource::from_env_value(Some("1")), FusedSource::Wgsl);
        assert_eq!(FusedSource::from_env_value(Some(" 1\n")), FusedSource::Wgsl);
        for v in [None, Some(""), Some("0"), Some("yes")] {
            assert_eq!(FusedSource::from_env_value(v), FusedSource::Auto, "{v:?}");
        }
    }

    /// The layout entries are numbered 0, 1, ... in list order, so wgpu's Metal backend (which counts buffers
    /// through the layout entries, group after group) gives entry `b` of group `g` the kernel's buffer index
    /// `sum(len of earlier groups) + b`, with the binding type each buffer's access needs.
    #[test]
    fn layout_entries_follow_binding_order_and_access() {
        let mut metal_index = 0;
        for (group, buffers) in EC_GEMV_GROUPS.iter().enumerate() {
            let entries = layout_entries(group);
            assert_eq!(entries.len(), buffers.len());
            for (i, (entry, &(name, access))) in entries.iter().zip(buffers.iter()).enumerate() {
                assert_eq!(entry.binding, i as u32, "{name}");
                assert_eq!(entry.count, None, "{name}");
                assert_eq!(entry.visibility, wgpu::ShaderStages::COMPUTE, "{name}");
                let ty = match entry.ty {
                    wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, .. } => ty,
                    other => panic!("{name}: {other:?}"),
                };
                let want = match access {
                    BufferAccess::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    BufferAccess::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    BufferAccess::Uniform => wgpu::BufferBindingType::Uniform,
                };
                assert_eq!(ty, want, "{name}");
                metal_index += 1;
            }
        }
        assert_eq!(metal_index, 11, "ec_gemv.metal declares buffers 0..=10");
    }

    #[test]
    fn failed_tiles_name_the_lowest() {
        assert!(first_failed_tile(&[0, 0, 0]).is_ok());
        assert!(first_failed_tile(&[]).is_ok());
        match first_failed_tile(&[0, 0, 2, 0, 1]) {
            Err(Error::CorruptStream { tile, reason }) => {
                assert_eq!(tile, 2);
                assert!(reason.starts_with("2 tile check(s)"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Tensors whose parameters would make the kernel return without writing are refused on the host.
    #[test]
    fn params_the_kernel_skips_are_refused() {
        let good = EcParams {
            rows: 40,
            cols: 256,
            bits: 4,
            group_size: 64,
            segment: 128,
            segments: 2,
            row_tiles: 2,
            precision: 12,
            total_words: 100,
            vectors: 1,
            low_bits: 0,
            reserved1: 0,
        };
        assert!(check_params(&good).is_ok());
        assert!(check_params(&EcParams { low_bits: 2, bits: 2, ..good }).is_ok());
        assert!(check_params(&EcParams { low_bits: 3, bits: 1, ..good }).is_ok());
        for bad in [
            EcParams { bits: 0, ..good },
            EcParams { bits: 9, ..good },
            EcParams { group_size: 0, ..good },
            EcParams { segment: 0, ..good },
            EcParams { segment: 96, ..good },
            EcParams { cols: 288, ..good },
            EcParams { precision: 13, ..good },
            EcParams { bits: 3, group_size: 63, segment: 126, cols: 252, ..good },
            EcParams { low_bits: 2, ..good },
            EcParams { low_bits: 1, bits: 2, ..good },
            EcParams { low_bits: 2, bits: 2, group_size: 8, segment: 128, ..good },
            EcParams { low_bits: 3, bits: 2, ..good },
            EcParams { low_bits: 3, bits: 1, group_size: 16, segment: 128, ..good },
        ] {
            assert!(check_params(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vector_counts_outside_one_to_eight_are_refused() {
        assert!(vectors(0).is_err());
        assert!(vectors(9).is_err());
        assert_eq!(vectors(1).unwrap(), 1);
        assert_eq!(vectors(8).unwrap(), 8);
    }
}
