//! Every WGSL kernel, in every specialization the crate builds ([`ecq::gpu::shaders::specializations`], the
//! same preprocessing as the pipelines), validates and translates to Metal Shading Language with naga's
//! msl-out backend under the options wgpu's Metal backend uses, and keeps its entry point. This is what runs
//! on Metal for every kernel but the fused one (and for the fused one with `ECQ_FORCE_WGSL=1`). No Metal
//! compiler checks the output here.
//!
//! Run: `cargo test --test wgsl_to_msl`.
#![cfg(feature = "gpu")]

use std::collections::HashMap;
use std::time::Instant;

use ecq::gpu::shaders::{self, Kernel, LaneMode, Spec};
use naga::back::msl;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use rayon::prelude::*;

/// MSL versions wgpu's Metal backend targets, by OS: macOS 11 (2.3), 12 (2.4), 13 (3.0), 14 (3.1), 15 (3.2),
/// 26 (4.0). Subgroup operations are offered from Apple7 / Mac2 / Metal 3 GPUs, which run macOS 11 and later.
const MSL_VERSIONS: [(u8, u8); 6] = [(2, 3), (2, 4), (3, 0), (3, 1), (3, 2), (4, 0)];

/// The naga capabilities wgpu derives from the device features a context requests on Metal: `SHADER_F16`
/// always (Apple GPUs have it), `SUBGROUP` and `SUBGROUP_BARRIER` only for the subgroup variants, so the
/// portable variants are also checked to need no subgroup capability.
fn capabilities(lanes: LaneMode) -> Capabilities {
    match lanes {
        LaneMode::Portable => Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        LaneMode::SubgroupWide | LaneMode::SubgroupNarrow => {
            capabilities(LaneMode::Portable) | Capabilities::SUBGROUP | Capabilities::SUBGROUP_BARRIER
        }
    }
}

/// The resource map wgpu's Metal backend builds from a pipeline layout that lists every binding in order:
/// buffers numbered through the groups in (group, binding) order, storage buffers that are written marked
/// mutable, and the sizes buffer after them when any storage buffer is bound.
fn resources(module: &naga::Module) -> msl::EntryPointResources {
    let mut bound: Vec<(naga::ResourceBinding, bool, bool)> = module
        .global_variables
        .iter()
        .filter_map(|(_, var)| {
            let binding = var.binding?;
            let (storage, mutable) = match var.space {
                naga::AddressSpace::Storage { access } => (true, access.contains(naga::StorageAccess::STORE)),
                _ => (false, false),
            };
            Some((binding, storage, mutable))
        })
        .collect();
    bound.sort_by_key(|(b, _, _)| (b.group, b.binding));
    let mut resources = msl::BindingMap::default();
    for (slot, &(binding, _, mutable)) in bound.iter().enumerate() {
        resources.insert(binding, msl::BindTarget { buffer: Some(slot as u8), mutable, ..Default::default() });
    }
    let any_storage = bound.iter().any(|&(_, storage, _)| storage);
    msl::EntryPointResources {
        resources,
        immediates_buffer: None,
        sizes_buffer: any_storage.then_some(bound.len() as u8),
    }
}

/// Parses and validates one specialization with the capabilities of its lane mode, then translates it at
/// each of `versions`; the MSL sources, or what went wrong.
fn translate(kernel: Kernel, spec: &Spec, versions: &[(u8, u8)]) -> Result<Vec<String>, String> {
    let src = shaders::source(kernel, spec);
    let module = naga::front::wgsl::parse_str(&src).map_err(|e| format!("parse: {}", e.emit_to_string(&src)))?;
    let info = Validator::new(ValidationFlags::all(), capabilities(spec.lanes))
        .validate(&module)
        .map_err(|e| format!("validate: {}", e.emit_to_string(&src)))?;
    let entry_names: Vec<String> = module.entry_points.iter().map(|ep| ep.name.clone()).collect();
    if entry_names != ["main"] {
        return Err(format!("entry points {entry_names:?}, expected [\"main\"]"));
    }
    versions
        .iter()
        .map(|&version| to_msl(&module, &info, spec, version).map_err(|e| format!("MSL {version:?}: {e}")))
        .collect()
}

/// The MSL of a validated module at one language version, under wgpu's Metal options.
fn to_msl(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    spec: &Spec,
    version: (u8, u8),
) -> Result<String, String> {
    let checked = naga::proc::BoundsCheckPolicy::Restrict;
    let options = msl::Options {
        lang_version: version,
        per_entry_point_map: msl::EntryPointResourceMap::from([("main".to_string(), resources(module))]),
        inline_samplers: Vec::new(),
        spirv_cross_compatibility: false,
        fake_missing_bindings: false,
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: checked,
            buffer: checked,
            image_load: checked,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        zero_initialize_workgroup_memory: true,
        force_loop_bounding: true,
        task_dispatch_limits: None,
        mesh_shader_primitive_indices_clamp: true,
        emit_int_div_checks: true,
        ray_query_initialization_tracking: true,
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, "main".to_string())),
        ..Default::default()
    };
    let (out, translation) =
        msl::write_string(module, info, &options, &pipeline).map_err(|e| format!("msl-out: {e:?}"))?;
    let [name] = translation.entry_point_names.as_slice() else {
        return Err(format!("{} translated entry points", translation.entry_point_names.len()));
    };
    let name = name.as_ref().map_err(|e| format!("entry point main: {e:?}"))?;
    if !out.contains(&format!("kernel void {name}(")) {
        return Err(format!("the MSL output has no `kernel void {name}(`"));
    }
    if version >= (2, 1) {
        let threads = format!("max_total_threads_per_threadgroup({})", spec.workgroup);
        if !out.contains(&threads) {
            return Err(format!("the MSL output lacks [[{threads}]]"));
        }
    }
    Ok(out)
}

/// A specialization less its decode-table precision and workgroup size, which set constants but no `//#if` switch:
/// what decides which of the kernel's lines are compiled, and so which MSL constructs the translation meets.
fn form(kernel: Kernel, spec: &Spec) -> (Kernel, Spec) {
    (kernel, Spec { precision: 0, workgroup: 0, ..*spec })
}

/// A specialization and the MSL versions it is translated at.
type Job<'a> = (Kernel, Spec, &'a [(u8, u8)]);

/// Every (kernel, specialization) the crate builds validates and translates to MSL, keeping its entry point and
/// workgroup size: the first of each form ([`form`]) at every MSL version wgpu targets, the others of that form at
/// one version each, in turn. (All of them at every version took about 14 minutes on two cores, most of it in the
/// MSL writer; its output differs between versions only where a construct does, and every form meets every
/// version through its first.)
#[test]
fn every_wgsl_specialization_translates_to_msl() {
    let specs = shaders::specializations();
    let start = Instant::now();
    let mut seen: HashMap<(Kernel, Spec), usize> = HashMap::new();
    let jobs: Vec<Job> = specs
        .iter()
        .map(|&(kernel, spec)| {
            let n = seen.entry(form(kernel, &spec)).or_insert(0);
            let versions: &[(u8, u8)] =
                if *n == 0 { &MSL_VERSIONS } else { std::slice::from_ref(&MSL_VERSIONS[*n % MSL_VERSIONS.len()]) };
            *n += 1;
            (kernel, spec, versions)
        })
        .collect();
    let failures: Vec<String> = jobs
        .par_iter()
        .filter_map(|&(kernel, ref spec, versions)| {
            translate(kernel, spec, versions).err().map(|e| format!("{} {spec:?}: {e}", kernel.file()))
        })
        .collect();
    eprintln!(
        "{} specializations in {} forms translated ({} translations) in {:.1} s",
        specs.len(),
        seen.len(),
        jobs.iter().map(|j| j.2.len()).sum::<usize>(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} failures, first:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
}

/// The listing covers every kernel in every lane mode, every bit width of the quantized kernels, and every
/// vector count, so the translation test above cannot silently shrink.
#[test]
fn specializations_cover_every_kernel_mode_width_and_vector_count() {
    let specs = shaders::specializations();
    for kernel in Kernel::ALL {
        for lanes in [LaneMode::Portable, LaneMode::SubgroupWide, LaneMode::SubgroupNarrow] {
            let of =
                |pred: &dyn Fn(&Spec) -> bool| specs.iter().any(|(k, s)| *k == kernel && s.lanes == lanes && pred(s));
            let widths: Vec<u32> = match kernel {
                // Neither the dense kernels nor the scales' reordering has a bit width.
                Kernel::GemvF32 | Kernel::GemvF16 | Kernel::ScaleRows => vec![0],
                _ => (1..=8).collect(),
            };
            for bits in widths {
                assert!(of(&|s| s.bits == bits), "{} {lanes:?} bits {bits}", kernel.file());
            }
            // Neither the tile decode nor the reorderings of x and of the scales depend on the vector count.
            let vectors: Vec<u32> = if matches!(kernel, Kernel::RansDecode | Kernel::XLanes | Kernel::ScaleRows) {
                vec![1]
            } else {
                (1..=8).collect()
            };
            for m in vectors {
                assert!(of(&|s| s.m == m), "{} {lanes:?} m {m}", kernel.file());
            }
        }
    }
    // Each specialization once.
    let mut keys: Vec<String> = specs.iter().map(|(k, s)| format!("{k:?} {s:?}")).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), specs.len());
}

/// The translation really checks something: a specialization whose WGSL uses a subgroup operation fails
/// validation without the subgroup capability.
#[test]
fn subgroup_source_needs_the_subgroup_capability() {
    let spec = Spec::new(LaneMode::SubgroupWide, 4, 12, 1, 128);
    let src = shaders::source(Kernel::RansDecode, &spec);
    let module = naga::front::wgsl::parse_str(&src).expect("parses");
    let result = Validator::new(ValidationFlags::all(), capabilities(LaneMode::Portable)).validate(&module);
    assert!(result.is_err(), "a subgroup kernel validated without the SUBGROUP capability");
    assert!(translate(Kernel::RansDecode, &spec, &[(3, 0)]).is_ok());
}
