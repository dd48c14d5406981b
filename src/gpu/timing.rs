//! Device-side timing with timestamp queries, for examples and benchmarks.

use std::time::Duration;

use super::context::GpuContext;
use crate::error::{Error, Result};

/// Runs `record` `runs` times in one submission and returns how long the device took for each run, measured
/// with timestamp queries written by empty compute passes just before and just after the run's commands
/// (only `Features::TIMESTAMP_QUERY` is needed). The runs execute back to back, so the first ones include
/// any warm-up; callers discard what they need to. Each run's time includes what its passes cost beyond
/// their dispatches: wgpu records every compute pass as command buffers of its own, and the two timestamp
/// passes add about 6 us on an H200's driver (see BENCHMARKS.md); [`time_passes_on_device`] leaves that out.
pub fn time_on_device(
    ctx: &GpuContext,
    runs: usize,
    mut record: impl FnMut(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<Vec<Duration>> {
    timed(ctx, runs, |encoder, queries, run| {
        mark(encoder, queries, Some(2 * run), None);
        record(encoder)?;
        mark(encoder, queries, None, Some(2 * run + 1));
        Ok(())
    })
}

/// Runs `record` `runs` times in one submission, each time into a compute pass of its own whose first and last
/// commands write timestamps, and returns how long each pass took on the device: the dispatches `record` makes
/// and the barriers between them, not what the pass itself costs around them (see [`time_on_device`]).
pub fn time_passes_on_device(
    ctx: &GpuContext,
    runs: usize,
    mut record: impl FnMut(&mut wgpu::ComputePass<'_>) -> Result<()>,
) -> Result<Vec<Duration>> {
    timed(ctx, runs, |encoder, queries, run| {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("ecq timed pass"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: queries,
                beginning_of_pass_write_index: Some(2 * run),
                end_of_pass_write_index: Some(2 * run + 1),
            }),
        });
        record(&mut pass)
    })
}

/// An empty compute pass that writes timestamp `begin` at its start and `end` at its end.
fn mark(encoder: &mut wgpu::CommandEncoder, queries: &wgpu::QuerySet, begin: Option<u32>, end: Option<u32>) {
    encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("ecq timestamp"),
        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
            query_set: queries,
            beginning_of_pass_write_index: begin,
            end_of_pass_write_index: end,
        }),
    });
}

/// Records run `i` with `record(encoder, queries, i)`, which writes timestamps `2 i` and `2 i + 1`, for every
/// run in one submission, and returns the time between each pair.
fn timed(
    ctx: &GpuContext,
    runs: usize,
    mut record: impl FnMut(&mut wgpu::CommandEncoder, &wgpu::QuerySet, u32) -> Result<()>,
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
    for run in 0..runs as u32 {
        record(&mut encoder, &queries, run)?;
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
