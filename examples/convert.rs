//! Converts a model to an ecq container with the library API, printing progress, then multiplies by one of its
//! encoded weights on the CPU.
//!
//! `cargo run --release --example convert -- SmolLM2-135M-Instruct.Q4_1.gguf smollm2.ecq.safetensors`

use std::path::PathBuf;

use ecq::model::{convert, ConvertOptions, Progress};
use ecq::EcModel;

fn main() -> ecq::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [input, output] = &args[..] else {
        eprintln!("usage: convert INPUT(.gguf | .safetensors | .safetensors.index.json) OUTPUT.safetensors");
        std::process::exit(2);
    };
    let options = ConvertOptions { verify: true, ..ConvertOptions::default() };
    let report = convert(input, output, &options, &mut |p: Progress<'_>| {
        if p.done % 50 == 0 || p.done == p.total {
            eprintln!("{:?}: {}/{} {}", p.stage, p.done, p.total, p.tensor);
        }
    })?;
    println!(
        "{} encoded ({:.4} bits/weight of symbol stream), {} passed through, {} -> {} bytes",
        report.encoded(),
        report.stream_bits() as f64 / report.weights().max(1) as f64,
        report.passthrough(),
        report.input_bytes,
        report.output_bytes
    );

    let model = EcModel::open(output)?;
    if let Some(name) = model.encoded_names().next() {
        let m = model.matmul_cpu(name)?;
        let x = vec![1.0f32; m.cols()];
        let mut y = vec![0f32; m.rows()];
        m.matvec(&x, &mut y)?;
        println!("{name}: y[0..4] = {:?} (row sums of the weights)", &y[..y.len().min(4)]);
    }
    Ok(())
}
