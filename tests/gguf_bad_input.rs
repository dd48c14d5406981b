//! Malformed GGUF files give typed errors that say what is wrong, never a panic: truncation at every length,
//! bad magic and versions, lying counts, strings, value types, dims, types, offsets and scales.

#[path = "gguf_support/mod.rs"]
mod support;

use ecq::format::gguf::GgufFile;
use ecq::Error;
use support::*;

fn open(bytes: &[u8]) -> ecq::Result<GgufFile> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    GgufFile::open(f.path())
}

/// Opens `bytes` expecting `InvalidFile` whose message contains `needle`.
fn expect_invalid(bytes: &[u8], needle: &str) {
    match open(bytes) {
        Err(Error::InvalidFile { reason }) => assert!(reason.contains(needle), "`{reason}` lacks `{needle}`"),
        other => panic!("expected InvalidFile containing `{needle}`, got {other:?}"),
    }
}

fn small_file() -> GgufWriter {
    let mut rng = Rng(7);
    let mut w = GgufWriter::new(3);
    w.kv_str("general.architecture", "llama");
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&2u64.to_le_bytes());
    put_string(&mut arr, b"<s>");
    put_string(&mut arr, b"</s>");
    w.kv_raw("tokenizer.ggml.tokens", 9, &arr);
    w.tensor("a", &[64, 3], Q4_1, random_blocks(&mut rng, Q4_1, 3, 64));
    w.tensor("b", &[32, 2], Q8_0, random_blocks(&mut rng, Q8_0, 2, 32));
    w.tensor("n", &[5], F32, vec![0; 20]);
    w
}

/// Offset of the first tensor info (just after the metadata), found by building the file without tensors.
fn tensor_infos_start(w: &GgufWriter) -> usize {
    let mut bare = w.clone();
    bare.tensors.clear();
    let bytes = bare.build();
    // Header (24 bytes) + metadata; build() pads to the alignment only after the tensor infos.
    let mut end = bytes.len();
    while end > 24 && bytes[end - 1] == 0 {
        end -= 1;
    }
    end
}

#[test]
fn truncated_at_every_length() {
    let bytes = small_file().build();
    assert!(open(&bytes).is_ok());
    for len in 0..bytes.len() {
        match open(&bytes[..len]) {
            Err(Error::InvalidFile { reason }) => {
                assert!(
                    reason.contains("truncated")
                        || reason.contains("fewer than the 24-byte header")
                        || reason.contains("bytes left")
                        || reason.contains("past the end")
                        || reason.contains("should start at offset"),
                    "length {len}: `{reason}`"
                )
            }
            other => panic!("length {len}: expected InvalidFile, got {other:?}"),
        }
    }
}

#[test]
fn bad_magic_and_versions() {
    let bytes = small_file().build();
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_invalid(&b, "not a GGUF file");
    for (version, needle) in
        [(1u32, "version 1 is not supported"), (4, "unknown GGUF version 4"), (0x0300_0000, "big-endian")]
    {
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&version.to_le_bytes());
        expect_invalid(&b, needle);
    }
}

#[test]
fn lying_counts_do_not_allocate() {
    let bytes = small_file().build();
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_invalid(&b, "tensor count");
    let mut b = bytes.clone();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_invalid(&b, "metadata entry count");
    // Array length: the tokens array says 2^60 strings.
    let mut w = GgufWriter::new(3);
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 60).to_le_bytes());
    put_string(&mut arr, b"<s>");
    w.kv_raw("tokenizer.ggml.tokens", 9, &arr);
    expect_invalid(&w.build(), "length of metadata `tokenizer.ggml.tokens`");
    // String length past the end.
    let mut w = GgufWriter::new(3);
    let mut v = (1u64 << 40).to_le_bytes().to_vec();
    v.extend_from_slice(b"abc");
    w.kv_raw("general.name", 8, &v);
    expect_invalid(&w.build(), "claims 1099511627776 bytes");
}

#[test]
fn bad_strings_and_value_types() {
    let mut w = GgufWriter::new(3);
    let mut v = Vec::new();
    put_string(&mut v, &[0xc3, 0x28]);
    w.kv_raw("general.name", 8, &v);
    expect_invalid(&w.build(), "not UTF-8");
    let mut w = GgufWriter::new(3);
    w.kv_raw("k", 13, &[0; 8]);
    expect_invalid(&w.build(), "unknown value type 13");
    let mut w = GgufWriter::new(3);
    w.kv_raw("k", 7, &[2]);
    expect_invalid(&w.build(), "bool with byte value 2");
    let mut w = GgufWriter::new(3);
    w.kv_u32("k", 1).kv_u32("k", 2);
    expect_invalid(&w.build(), "appears twice");
    // Arrays nested deeper than the limit.
    let mut nested = 4u32.to_le_bytes().to_vec();
    nested.extend_from_slice(&0u64.to_le_bytes());
    for _ in 0..20 {
        let mut outer = 9u32.to_le_bytes().to_vec();
        outer.extend_from_slice(&1u64.to_le_bytes());
        outer.extend_from_slice(&nested);
        nested = outer;
    }
    let mut w = GgufWriter::new(3);
    w.kv_raw("deep", 9, &nested);
    expect_invalid(&w.build(), "nests arrays deeper");
    let mut w = GgufWriter::new(3);
    let mut arr = 77u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&0u64.to_le_bytes());
    w.kv_raw("k", 9, &arr);
    expect_invalid(&w.build(), "unknown value type 77");
}

#[test]
fn bad_alignment() {
    for a in [0u32, 3, 48] {
        let mut w = small_file();
        w.kv_u32("general.alignment", a);
        expect_invalid(&w.build(), "general.alignment must be a u32 power of two");
    }
    let mut w = small_file();
    w.kv_str("general.alignment", "32");
    expect_invalid(&w.build(), "general.alignment");
}

#[test]
fn bad_tensor_infos() {
    let mut w = small_file();
    w.tensors[0].dims = vec![32, 1, 1, 1, 1];
    expect_invalid(&w.build(), "5 dims");
    let mut w = small_file();
    w.tensors[1].name = "a".into();
    expect_invalid(&w.build(), "appears twice");
    let mut w = small_file();
    w.tensors[0].dims = vec![u64::MAX, 2];
    expect_invalid(&w.build(), "beyond the signed 64-bit range");
    let mut w = small_file();
    w.tensors[0].dims = vec![1 << 40, 1 << 40];
    expect_invalid(&w.build(), "too many elements");
    // A name that is not UTF-8.
    let mut w = small_file();
    w.tensors[0].name = "a".into();
    let mut b = w.build();
    let at = tensor_infos_start(&w) + 8;
    assert_eq!(b[at], b'a');
    b[at] = 0xff;
    expect_invalid(&b, "name of tensor 0");
}

#[test]
fn wrong_shapes() {
    // K not a multiple of the 32-weight block.
    let mut w = small_file();
    w.tensors[0].dims = vec![48, 4];
    expect_invalid(&w.build(), "not a multiple of its block of 32");
    // Dims claiming more data than the file holds.
    let mut w = small_file();
    w.tensors[2].dims = vec![5000];
    expect_invalid(&w.build(), "needs 20000 bytes");
    // Dims claiming more data than the tensor has: it runs into the next tensor.
    let mut w = small_file();
    w.tensors[0].dims = vec![64, 6];
    expect_invalid(&w.build(), "overlaps");
}

#[test]
fn lying_offsets() {
    let mut w = small_file();
    w.tensors[1].offset = Some(3);
    expect_invalid(&w.build(), "not a multiple of the alignment");
    let mut w = small_file();
    w.tensors[1].offset = Some(u64::MAX - 31);
    expect_invalid(&w.build(), "past the end");
    let mut w = small_file();
    w.tensors[1].offset = Some(1 << 20);
    expect_invalid(&w.build(), "past the end");
    let mut w = small_file();
    w.tensors[1].offset = Some(0);
    expect_invalid(&w.build(), "overlaps tensor");
}

#[test]
fn unknown_quant_type_listed_but_not_readable() {
    let mut w = small_file();
    w.tensors[0].ty = 12; // Q4_K, 256-weight blocks: the 64 columns are not a multiple
    expect_invalid(&w.build(), "Q4_K (type 12) with 64 columns");
    let mut w = small_file();
    w.tensors[0].ty = 4242;
    let g = open(&w.build()).unwrap();
    assert_eq!(g.tensors().len(), 3);
    match g.tensor("a") {
        Err(Error::UnsupportedDtype { name, dtype, hint }) => {
            assert_eq!(name, "a");
            assert_eq!(dtype, "unknown ggml type 4242");
            assert!(hint.contains("Q4_1"), "{hint}");
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
    assert!(g.quantized("b").is_ok());
}

#[test]
fn scales_that_cannot_be_imported() {
    // Q4_0 d = 8192: bias -8 d = -65536 overflows f16. Q8_0 d = 512: -128 d overflows.
    // Q4_1 d = inf, and m = NaN.
    let cases: [(u32, Vec<u8>, &str); 4] = [
        (Q4_0, [0x00u8, 0x70].into_iter().chain([0; 16]).collect(), "bias -65536"),
        (Q8_0, [0x00u8, 0x60].into_iter().chain([0; 32]).collect(), "bias -65536"),
        (Q4_1, [0x00u8, 0x7c, 0, 0].into_iter().chain([0; 16]).collect(), "d inf"),
        (Q4_1, [0x00u8, 0x3c, 0x00, 0x7e].into_iter().chain([0; 16]).collect(), "bias NaN"),
    ];
    for (ty, block, needle) in cases {
        let mut w = GgufWriter::new(3);
        w.tensor("t", &[32, 1], ty, block);
        let g = open(&w.build()).unwrap();
        match g.quantized("t") {
            Err(Error::InvalidFile { reason }) => {
                assert!(reason.contains(needle) && reason.contains("`t`"), "`{reason}` lacks `{needle}`")
            }
            other => panic!("expected InvalidFile, got {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(GgufFile::open(dir.path().join("nope.gguf")), Err(Error::Io { .. })));
}

/// Random byte corruption anywhere in the file: opening and reading every tensor returns, never panics, and
/// whatever opens still satisfies the reader's invariants (data inside the file).
#[test]
fn random_corruption_never_panics() {
    let bytes = small_file().build();
    let mut rng = Rng(99);
    let mut opened = 0;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() % b.len() as u64) as usize;
            b[i] = rng.byte();
        }
        if let Ok(g) = open(&b) {
            opened += 1;
            for t in g.tensors() {
                if let Some(size) = t.size {
                    assert!(t.offset + size <= b.len() as u64, "{}", t.name);
                }
                let _ = g.tensor(&t.name);
            }
        }
    }
    // Corrupting tensor data or unused bytes must not stop a file from opening.
    assert!(opened > 0);
}
