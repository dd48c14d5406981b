//! [`GpuContext`]: one device and queue, the features and limits the kernels may use, and the pipeline cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::kernels;
use super::metal::{self, FusedSource, MslCache};
use super::shaders::{self, Kernel, LaneMode, Spec};
use crate::error::{Error, Result};

/// Which kernel variant a context builds: the switch that lets tests cover both on any device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KernelPath {
    /// Subgroup kernels where the device has subgroup operations at a width the kernels handle, else portable.
    #[default]
    Auto,
    /// Workgroup-memory kernels only, whatever the device offers.
    Portable,
    /// Subgroup kernels; building a context with this path fails on a device without them.
    Subgroup,
}

/// Features the kernels use where the adapter has them.
const WANTED_FEATURES: wgpu::Features = wgpu::Features::SUBGROUP
    .union(wgpu::Features::SUBGROUP_BARRIER)
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::TIMESTAMP_QUERY);

/// A device, its queue and a pipeline cache, shared by every GPU object built from it.
///
/// Cloning is cheap and shares the device and cache; [`with_path`](Self::with_path) gives a clone that builds
/// another kernel variant.
#[derive(Clone)]
pub struct GpuContext {
    shared: Arc<Shared>,
    lanes: LaneMode,
    path: KernelPath,
    fused: FusedSource,
    fused_msl: bool,
    compute_units: Option<u32>,
    integer_dot: bool,
}

struct Shared {
    info: wgpu::AdapterInfo,
    device: wgpu::Device,
    queue: wgpu::Queue,
    features: wgpu::Features,
    limits: wgpu::Limits,
    pipelines: Mutex<HashMap<(Kernel, Spec), wgpu::ComputePipeline>>,
    layouts: Mutex<HashMap<Kernel, Arc<Vec<wgpu::BindGroupLayout>>>>,
    msl: MslCache,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.describe()).field("lanes", &self.lanes).finish()
    }
}

impl GpuContext {
    /// Opens the default adapter: a high-performance one on Vulkan, Metal or DX12 (the GL backend lacks subgroup
    /// operations), or on the backends named by `WGPU_BACKEND` (e.g. `vulkan`, `gl`); with `WGPU_ADAPTER_NAME`
    /// set, the first adapter whose name contains it (case-insensitive). The device gets the adapter's own
    /// limits and, where present, the features `SUBGROUP`, `SUBGROUP_BARRIER`, `SHADER_F16` and `TIMESTAMP_QUERY`
    /// (and on Metal `PASSTHROUGH_SHADERS`, for the MSL fused kernel: see [`FusedSource`]).
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// [`new`](Self::new) without blocking.
    pub async fn new_async() -> Result<Self> {
        Self::with_features_async(wgpu::Features::empty()).await
    }

    /// [`new`](Self::new), the device also given those of `extra` that the adapter has (e.g. `PASSTHROUGH_SHADERS`
    /// for [`super::kernels::spirv_pipeline`]).
    pub fn with_features(extra: wgpu::Features) -> Result<Self> {
        pollster::block_on(Self::with_features_async(extra))
    }

    /// [`with_features`](Self::with_features) without blocking.
    pub async fn with_features_async(extra: wgpu::Features) -> Result<Self> {
        let default_backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
        let backends = wgpu::Backends::from_env().unwrap_or(default_backends);
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(wanted) if !wanted.is_empty() => {
                let adapters = instance.enumerate_adapters(backends).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                let needle = wanted.to_lowercase();
                adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&needle)).ok_or_else(|| {
                    Error::Gpu(format!(
                        "no adapter name contains WGPU_ADAPTER_NAME={wanted:?} on backends {backends:?}; \
                         adapters found: {names:?}"
                    ))
                })?
            }
            _ => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    force_fallback_adapter: false,
                    compatible_surface: None,
                    apply_limit_buckets: false,
                })
                .await
                .map_err(|e| {
                    Error::Gpu(format!(
                        "no GPU adapter on backends {backends:?} ({e}); install a Vulkan, Metal or DX12 driver \
                         (without a GPU, a software Vulkan: `apt-get install mesa-vulkan-drivers`), or pick \
                         backends with WGPU_BACKEND"
                    ))
                })?,
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ecq"),
                required_features: adapter.features()
                    & (WANTED_FEATURES | metal::wanted_features(adapter.get_info().backend) | extra),
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Gpu(format!("the adapter refused a device: {e}")))?;
        Ok(Self::from_device(device, queue))
    }

    /// Wraps a device the caller already opened. The kernels use what the device was created with: subgroup
    /// kernels need `Features::SUBGROUP`, and a 16 KiB decode table (`P = 12`) needs
    /// `max_compute_workgroup_storage_size` above the WebGPU default.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        let features = device.features();
        let limits = device.limits();
        let shared = Shared {
            info,
            device,
            queue,
            features,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
            msl: MslCache::default(),
        };
        let compute_units = compute_units(&shared.device);
        let integer_dot = integer_dot(&shared.device);
        let mut ctx = Self {
            shared: Arc::new(shared),
            lanes: LaneMode::Portable,
            path: KernelPath::Auto,
            fused: FusedSource::Auto,
            fused_msl: false,
            compute_units,
            integer_dot,
        };
        ctx.lanes = ctx.subgroup_mode().unwrap_or(LaneMode::Portable);
        // Auto and Wgsl always resolve.
        ctx.fused = FusedSource::from_env();
        ctx.fused_msl = metal::use_msl(ctx.fused, ctx.shared.info.backend, ctx.shared.features).unwrap_or(false);
        ctx
    }

    /// A context on the same device and pipeline cache that builds the kernels of `path`. Fails for
    /// [`KernelPath::Subgroup`] where the device has no usable subgroup operations.
    pub fn with_path(&self, path: KernelPath) -> Result<Self> {
        let lanes = match path {
            KernelPath::Portable => LaneMode::Portable,
            KernelPath::Auto => self.subgroup_mode().unwrap_or(LaneMode::Portable),
            KernelPath::Subgroup => self.subgroup_mode().ok_or_else(|| {
                Error::Gpu(format!(
                    "{} has no subgroup operations at a width the kernels handle (feature SUBGROUP: {}, \
                     subgroup sizes {}..={}); use KernelPath::Auto or Portable",
                    self.shared.info.name,
                    self.shared.features.contains(wgpu::Features::SUBGROUP),
                    self.shared.info.subgroup_min_size,
                    self.shared.info.subgroup_max_size
                ))
            })?,
        };
        Ok(Self { lanes, path, ..self.clone() })
    }

    /// A context on the same device and caches whose fused products are built from `source`. Fails for
    /// [`FusedSource::Msl`] where the device cannot run it (not Metal, or no `PASSTHROUGH_SHADERS`).
    pub fn with_fused_source(&self, source: FusedSource) -> Result<Self> {
        let fused_msl = metal::use_msl(source, self.shared.info.backend, self.shared.features).map_err(Error::Gpu)?;
        Ok(Self { fused: source, fused_msl, ..self.clone() })
    }

    /// A context on the same device and caches that takes the device to have `units` compute units (NVIDIA's
    /// SMs), or not to say (None), whatever it reported: for tests and benchmarks of the choices that depend on it
    /// ([`kernels::vector_groups`], [`kernels::row_tile_pairs`], [`kernels::spread_slabs`], [`kernels::stage_x`],
    /// [`kernels::early_x`], [`kernels::task_blocks`]).
    pub fn with_compute_units(&self, units: Option<u32>) -> Self {
        Self { compute_units: units, ..self.clone() }
    }

    /// The device's compute units where its driver reports them: NVIDIA's SMs on Vulkan
    /// (`VK_NV_shader_sm_builtins`); None elsewhere (wgpu does not report them).
    pub fn compute_units(&self) -> Option<u32> {
        self.compute_units
    }

    /// A context on the same device and caches that takes the device to run dot products of packed 8-bit integers
    /// at full speed, or not, whatever it reported: for tests and benchmarks of the kernels that use them
    /// ([`kernels::integer_dot`], [`kernels::task_blocks`]; any device runs them correctly, a slow one through
    /// several instructions each).
    pub fn with_integer_dot(&self, fast: bool) -> Self {
        Self { integer_dot: fast, ..self.clone() }
    }

    /// Whether the device runs dot products of four packed signed 8-bit integers as one instruction: where its
    /// Vulkan driver says so (`integerDotProduct4x8BitPackedSignedAccelerated`, Vulkan 1.3 or
    /// `VK_KHR_shader_integer_dot_product`); false elsewhere (wgpu does not report it).
    pub fn integer_dot(&self) -> bool {
        self.integer_dot
    }

    /// The fused-kernel source this context was asked for.
    pub fn fused_source(&self) -> FusedSource {
        self.fused
    }

    /// Whether [`crate::Strategy::Fused`] products of this context run the MSL kernel (for up to 8 vectors).
    pub fn fused_uses_msl(&self) -> bool {
        self.fused_msl
    }

    /// The MSL kernels' cache.
    pub(crate) fn msl_cache(&self) -> &MslCache {
        &self.shared.msl
    }

    /// The subgroup variant this device runs, if any: every subgroup at least 32 wide (one ballot per tile),
    /// or every subgroup at most 32 wide (ballots per subgroup plus a workgroup exchange).
    fn subgroup_mode(&self) -> Option<LaneMode> {
        let info = &self.shared.info;
        if !self.shared.features.contains(wgpu::Features::SUBGROUP) || info.subgroup_min_size == 0 {
            return None;
        }
        if info.subgroup_min_size >= 32 {
            Some(LaneMode::SubgroupWide)
        } else if info.subgroup_max_size <= 32 && info.subgroup_min_size >= 4 {
            Some(LaneMode::SubgroupNarrow)
        } else {
            None
        }
    }

    /// The path this context was asked for.
    pub fn path(&self) -> KernelPath {
        self.path
    }
    /// The kernel variant this context builds.
    pub fn lane_mode(&self) -> LaneMode {
        self.lanes
    }
    /// The adapter the device was opened on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.shared.info
    }
    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.shared.device
    }
    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.shared.queue
    }
    /// The features the device was created with.
    pub fn features(&self) -> wgpu::Features {
        self.shared.features
    }
    /// The limits the device was created with.
    pub fn limits(&self) -> &wgpu::Limits {
        &self.shared.limits
    }

    /// One line for people: adapter name, backend, device type, driver, subgroup sizes, compute units where known,
    /// kernel variant and, where it applies, that the fused kernel is the MSL one.
    pub fn describe(&self) -> String {
        let i = &self.shared.info;
        format!(
            "{} ({:?}, {:?}, driver {} {}), subgroups {}..={}{}{}{}, kernels {:?}{}",
            i.name,
            i.backend,
            i.device_type,
            i.driver,
            i.driver_info,
            i.subgroup_min_size,
            i.subgroup_max_size,
            if self.shared.features.contains(wgpu::Features::SUBGROUP) { "" } else { " (feature absent)" },
            self.compute_units.map_or(String::new(), |n| format!(", {n} compute units")),
            if self.integer_dot { ", 8-bit dot products" } else { "" },
            self.lanes,
            if self.fused_msl { ", fused kernel MSL" } else { "" }
        )
    }

    /// The pipeline of `kernel` specialized by `spec`, built on first use and cached; refused where it needs
    /// more workgroup memory or invocations than the device allows (see [`build_pipeline`](Self::build_pipeline)).
    pub(crate) fn pipeline(&self, kernel: Kernel, spec: Spec) -> Result<wgpu::ComputePipeline> {
        let limit = self.shared.limits.max_compute_invocations_per_workgroup;
        if spec.workgroup > limit {
            return Err(Error::Gpu(format!(
                "{} needs {} invocations per workgroup, the device allows {limit}",
                kernel.file(),
                spec.workgroup
            )));
        }
        let mut cache = self.shared.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&(kernel, spec)) {
            return Ok(p.clone());
        }
        let pipeline = self
            .build_pipeline(kernel, kernel.file(), shaders::source(kernel, &spec), true)
            .map_err(|e| Error::Gpu(format!("building {} with {spec:?} failed: {e}", kernel.file())))?;
        cache.insert((kernel, spec), pipeline.clone());
        Ok(pipeline)
    }

    /// A pipeline of `kernel`'s bind group layouts from `source`, uncached; the error is the validation
    /// message, or the workgroup memory `source` declares where that is past the device's limit. Built as the
    /// crate's kernels are: without naga's loop counters, with its bounds checks (unless `bounds_checks` is
    /// false, for timing what they cost), so every loop of `source` must end by itself (see the SAFETY note
    /// inside).
    pub(crate) fn build_pipeline(
        &self,
        kernel: Kernel,
        label: &str,
        source: String,
        bounds_checks: bool,
    ) -> std::result::Result<wgpu::ComputePipeline, String> {
        let device = &self.shared.device;
        self.check_workgroup_bytes(kernel, &source)?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let descriptor =
            wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(source.into()) };
        // The loop counter naga adds to every loop (against infinite loops) costs instructions and a branch on
        // every trip, and keeps the driver from unrolling the loops over vectors and weights.
        let checks = wgpu::ShaderRuntimeChecks {
            force_loop_bounding: false,
            bounds_checks,
            ..wgpu::ShaderRuntimeChecks::checked()
        };
        // SAFETY: every loop of the crate's WGSL kernels counts a u32 up to a bound taken from the shape (tiles,
        // segments, steps, rows, columns, table size, vectors) by a positive stride (a constant, the workgroup
        // size, or the workgroup count) and stops there, or halves a stride down to 0; the shapes are far below
        // 2^31, so no counter wraps and every loop ends. Bounds checks stay on. (Edited sources from
        // `kernels::edited_pipeline` carry the same obligation, stated there.)
        let module = unsafe { device.create_shader_module_trusted(descriptor, checks) };
        self.finish_pipeline(kernel, label, &module, scope)
    }

    /// wgpu does not hold a kernel's workgroup memory to the device's limit (and one past it may hang the device),
    /// so the WGSL source's own declarations are.
    fn check_workgroup_bytes(&self, kernel: Kernel, source: &str) -> std::result::Result<(), String> {
        let bytes = shaders::declared_workgroup_bytes(source)?;
        let limit = self.shared.limits.max_compute_workgroup_storage_size as u64;
        if bytes > limit {
            let advice = match kernel {
                Kernel::RansDecode | Kernel::EcGemv => {
                    "; re-encode with a lower precision P (the decode table takes 4 * 2^P bytes)"
                }
                _ => "",
            };
            return Err(format!("it declares {bytes} bytes of workgroup memory, the device allows {limit}{advice}"));
        }
        Ok(())
    }

    /// The pipeline of `module`'s entry point `main` under `kernel`'s bind group layouts, or the validation error
    /// that `scope` (pushed before the module was created) caught.
    fn finish_pipeline(
        &self,
        kernel: Kernel,
        label: &str,
        module: &wgpu::ShaderModule,
        scope: wgpu::ErrorScopeGuard,
    ) -> std::result::Result<wgpu::ComputePipeline, String> {
        let device = &self.shared.device;
        let layouts = self.layouts(kernel);
        let groups: Vec<Option<&wgpu::BindGroupLayout>> = layouts.iter().map(Some).collect();
        let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &groups,
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: Some(&layout),
            module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(e.to_string()),
            None => Ok(pipeline),
        }
    }

    /// A pipeline of `kernel` (its bind group layouts, entry point `main`) from SPIR-V words compiled from the WGSL
    /// `source`, passed to the driver through `Device::create_shader_module_passthrough`; the device needs
    /// `PASSTHROUGH_SHADERS`. The source's workgroup memory is held to the device's limit, as in `build_pipeline`.
    ///
    /// # Safety
    /// `words` must be a valid SPIR-V module, compiled from `source`, whose compute entry point `main` runs in
    /// workgroups of `workgroup` invocations and binds what the kernel's layouts hold; wgpu checks none of it, and
    /// every index the module computes must lie within its array.
    pub(crate) unsafe fn build_spirv_pipeline(
        &self,
        kernel: Kernel,
        label: &str,
        source: &str,
        words: &[u32],
        workgroup: u32,
    ) -> std::result::Result<wgpu::ComputePipeline, String> {
        if !self.shared.features.contains(wgpu::Features::PASSTHROUGH_SHADERS) {
            return Err("the device was opened without PASSTHROUGH_SHADERS".into());
        }
        self.check_workgroup_bytes(kernel, source)?;
        let device = &self.shared.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let entry_points =
            [wgpu::PassthroughShaderEntryPoint { name: "main".into(), workgroup_size: (workgroup, 1, 1) }];
        // SAFETY: the caller's obligation, stated above.
        let module = unsafe {
            device.create_shader_module_passthrough(wgpu::ShaderModuleDescriptorPassthrough {
                label: Some(label),
                entry_points: entry_points[..].into(),
                spirv: Some(words.into()),
                ..Default::default()
            })
        };
        self.finish_pipeline(kernel, label, &module, scope)
    }

    /// The bind group layouts of `kernel`, built once.
    pub(crate) fn layouts(&self, kernel: Kernel) -> Arc<Vec<wgpu::BindGroupLayout>> {
        // x_lanes runs on q_gemv's bind groups.
        let kernel = if kernel == Kernel::XLanes { Kernel::QGemv } else { kernel };
        let mut cache = self.shared.layouts.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(kernel)
            .or_insert_with(|| Arc::new(kernels::bind_group_layouts(&self.shared.device, kernel)))
            .clone()
    }

    /// Checks a buffer size against the storage-binding and buffer limits.
    pub(crate) fn check_storage_size(&self, what: &str, bytes: u64) -> Result<()> {
        let binding = self.shared.limits.max_storage_buffer_binding_size;
        let buffer = self.shared.limits.max_buffer_size;
        if bytes > binding.min(buffer) {
            return Err(Error::Gpu(format!(
                "{what} takes {bytes} bytes, above this device's storage binding limit of {} bytes; split the \
                 tensor along its rows into parts below the limit",
                binding.min(buffer)
            )));
        }
        Ok(())
    }

    /// A storage buffer holding `data` (at least 4 bytes, so empty arrays still bind), size-checked.
    pub(crate) fn storage_init(&self, label: &str, data: &[u8], extra: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        self.check_storage_size(label, data.len() as u64)?;
        let size = (data.len() as u64).max(4).next_multiple_of(4);
        let buffer = self.shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | extra,
            mapped_at_creation: true,
        });
        buffer.slice(..).get_mapped_range_mut().map_err(map_error)?.slice(..data.len()).copy_from_slice(data);
        buffer.unmap();
        Ok(buffer)
    }

    /// An uninitialized storage buffer of `bytes` bytes (at least 4), size-checked.
    pub(crate) fn storage(&self, label: &str, bytes: u64, extra: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        self.check_storage_size(label, bytes)?;
        Ok(self.shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | extra,
            mapped_at_creation: false,
        }))
    }

    /// A uniform buffer holding `data`.
    pub(crate) fn uniform(&self, label: &str, data: &[u32]) -> Result<wgpu::Buffer> {
        let buffer = self.shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (data.len() as u64 * 4).max(16).next_multiple_of(16),
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        buffer
            .slice(..)
            .get_mapped_range_mut()
            .map_err(map_error)?
            .slice(..data.len() * 4)
            .copy_from_slice(bytemuck::cast_slice(data));
        buffer.unmap();
        Ok(buffer)
    }

    /// Submits `encoder` and waits for the device, turning validation and out-of-memory errors into
    /// [`Error::Gpu`].
    pub(crate) fn submit_and_wait(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        let device = &self.shared.device;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let index = self.shared.queue.submit([encoder.finish()]);
        if let Some(e) = pollster::block_on(memory.pop()) {
            return Err(Error::Gpu(format!("out of device memory: {e}")));
        }
        if let Some(e) = pollster::block_on(validation.pop()) {
            return Err(Error::Gpu(format!("the device rejected a command: {e}")));
        }
        device
            .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
            .map_err(|e| Error::Gpu(format!("waiting for the device failed: {e}")))?;
        Ok(())
    }

    /// Copies `bytes` bytes of `buffer` (which needs `COPY_SRC`) back to the host.
    pub fn read_back(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let device = &self.shared.device;
        let size = bytes.max(4).next_multiple_of(4);
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("ecq read back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
        self.submit_and_wait(encoder)?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Gpu(format!("waiting for the device failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Gpu("buffer mapping was dropped".into()))?
            .map_err(|e| Error::Gpu(format!("mapping the read-back buffer failed: {e}")))?;
        let data = staging.get_mapped_range(..).map_err(map_error)?[..bytes as usize].to_vec();
        staging.unmap();
        Ok(data)
    }
}

fn map_error(e: wgpu::MapRangeError) -> Error {
    Error::Gpu(format!("mapping a buffer failed: {e}"))
}

/// What [`GpuContext::compute_units`] reports for `device`.
fn compute_units(device: &wgpu::Device) -> Option<u32> {
    #[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
    if device.adapter_info().backend == wgpu::Backend::Vulkan {
        return vulkan_compute_units(device);
    }
    let _ = device;
    None
}

/// What [`GpuContext::integer_dot`] reports for `device`.
fn integer_dot(device: &wgpu::Device) -> bool {
    #[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
    if device.adapter_info().backend == wgpu::Backend::Vulkan {
        return vulkan_integer_dot(device);
    }
    let _ = device;
    false
}

/// What `read` finds on the Vulkan physical device under `device`, given its instance, its handle and its API version,
/// where instance and device are Vulkan 1.1 or later (for vkGetPhysicalDeviceProperties2); None elsewhere.
#[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn vulkan_physical<T>(
    device: &wgpu::Device,
    read: impl FnOnce(&ash::Instance, ash::vk::PhysicalDevice, u32) -> Option<T>,
) -> Option<T> {
    use ash::vk;
    // SAFETY: the hal device is only read here, for its physical device and instance, while `device` keeps it
    // alive; nothing is created or destroyed through it.
    let hal = unsafe { device.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let shared = hal.shared_instance();
    if shared.instance_api_version() < vk::API_VERSION_1_1 {
        return None;
    }
    let instance = shared.raw_instance();
    let physical = hal.raw_physical_device();
    // SAFETY: `physical` is a valid handle of `instance` (both from the live hal device).
    let api = unsafe { instance.get_physical_device_properties(physical) }.api_version;
    if api < vk::API_VERSION_1_1 {
        return None;
    }
    read(instance, physical, api)
}

/// Whether the Vulkan physical device `physical` of `instance` offers the device extension `name`.
#[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn vulkan_extension(instance: &ash::Instance, physical: ash::vk::PhysicalDevice, name: &std::ffi::CStr) -> bool {
    // SAFETY: `physical` is a valid handle of `instance` (from `vulkan_physical`).
    unsafe { instance.enumerate_device_extension_properties(physical) }
        .is_ok_and(|list| list.iter().any(|e| e.extension_name_as_c_str() == Ok(name)))
}

/// Whether a Vulkan driver runs packed signed 8-bit dot products as one instruction.
#[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn vulkan_integer_dot(device: &wgpu::Device) -> bool {
    use ash::vk;
    vulkan_physical(device, |instance, physical, api| {
        if api < vk::API_VERSION_1_3 && !vulkan_extension(instance, physical, vk::KHR_SHADER_INTEGER_DOT_PRODUCT_NAME) {
            return None;
        }
        let mut dot = vk::PhysicalDeviceShaderIntegerDotProductProperties::default();
        let mut properties = vk::PhysicalDeviceProperties2::default().push_next(&mut dot);
        // SAFETY: `physical` is a valid handle of `instance`; the chained structure is core in Vulkan 1.3 or belongs to
        // an extension the device supports.
        unsafe { instance.get_physical_device_properties2(physical, &mut properties) };
        Some(dot.integer_dot_product4x8_bit_packed_signed_accelerated == vk::TRUE)
    })
    .unwrap_or(false)
}

/// The SMs an NVIDIA Vulkan driver reports (`VK_NV_shader_sm_builtins`); None from other drivers.
#[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn vulkan_compute_units(device: &wgpu::Device) -> Option<u32> {
    use ash::vk;
    vulkan_physical(device, |instance, physical, _| {
        if !vulkan_extension(instance, physical, vk::NV_SHADER_SM_BUILTINS_NAME) {
            return None;
        }
        let mut sm = vk::PhysicalDeviceShaderSMBuiltinsPropertiesNV::default();
        let mut properties = vk::PhysicalDeviceProperties2::default().push_next(&mut sm);
        // SAFETY: `physical` is a valid handle of `instance`; the chained structure belongs to an extension the device
        // supports.
        unsafe { instance.get_physical_device_properties2(physical, &mut properties) };
        (sm.shader_sm_count > 0).then_some(sm.shader_sm_count)
    })
}
