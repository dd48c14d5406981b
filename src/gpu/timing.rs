//! Device-side timing with timestamp queries, for examples and benchmarks.

use std::time::Duration;

use super::context::GpuContext;
use crate::error::{Error, Result};

/// Runs `record` `runs` times in one submission and returns how long the device took for each run, measured
/// with timestamp queries written by empty compute passes just before and just after the run's commands
/// (only `Features::TIMESTAMP_QUERY` is needed). The runs execute back to back, so the first ones include
/// any warm-up; callers discard what they need to.
pub fn time_on_device(
    ctx: &GpuContext,
    runs: usize,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<Vec<Duration>> {
    if !ctx.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
        return Err(Error::Gpu(format!(
            "{} has no timestamp queries (Features::TIMESTAMP_QUERY); time with wall clocks instead",
            ctx.adapter_info().name
        )));
    }
    if runs == 0 {
        return Ok(Vec::new());
    }
    let count = u32::try_from(2 * runs)
        .ok()
        .filter(|&c| c <= wgpu::QUERY_SET_MAX_QUERIES)
        .ok_or_else(|| Error::param("runs", format!("at most {} runs", wgpu::QUERY_SET_MAX_QUERIES / 2)))?;
    let device = ctx.device();
    let queries = device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("ecq timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count,
    });
    let resolved = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("ecq timestamps"),
        size: count as u64 * 8,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    let mark = |encoder: &mut wgpu::CommandEncoder, begin: Option<u32>, end: Option<u32>| {
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("ecq timestamp"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: begin,
                end_of_pass_write_index: end,
            }),
        });
    };
    for run in 0..runs as u32 {
        mark(&mut encoder, Some(2 * run), None);
        record(&mut encoder)?;
        mark(&mut encoder, None, Some(2 * run + 1));
    }
    encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
    ctx.submit_and_wait(encoder)?;
    let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&ctx.read_back(&resolved, count as u64 * 8)?);
    let period_ns = ctx.queue().get_timestamp_period() as f64;
    Ok(ticks
        .chunks_exact(2)
        .map(|t| Duration::from_nanos((t[1].saturating_sub(t[0]) as f64 * period_ns).round() as u64))
        .collect())
}
