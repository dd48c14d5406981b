//! The tile codec: 32 interleaved rANS states, one per row, sharing one stream of 16-bit words.
//!
//! READ ME FIRST
//! - A tile is 32 rows (lanes) by one segment of columns. Each step `t` decodes one joint symbol per active
//!   lane, then renormalizes the lanes in ascending order, each taking at most one word from the shared stream.
//! - Encoding runs in reverse: steps descending, lanes descending, "emit a word if needed, then encode". The
//!   encoder therefore produces the words back to front; they are reversed once per tile before storing.
//! - Every state starts at `L = 2^16` in the encoder, so a correct decode ends with every active state at
//!   `2^16` again and every word of the tile consumed: a free integrity check.
//! - State `x` lives in `[2^16, 2^32)`. Encoding symbol `s` (frequency `f`, cumulative `c`) is
//!   `x = (x / f) * 2^P + x % f + c`, valid without overflow only for `x < f * 2^(32-P)`: above that the low
//!   16 bits are emitted first. Decoding is `x = f * (x >> P) + (x & (2^P-1)) - c`, then one word is shifted
//!   in if `x < 2^16`.
//! - The loops in this file are the reference ([`Kernel::Reference`]). [`Kernel::Fast`] (the default) runs the
//!   reciprocal encoder of `fast.rs` and, where the CPU has AVX2, the SIMD decoder of `avx2.rs`; both must give
//!   exactly the reference's words, states, symbols and faults (tests/rans_*.rs check it).

use rayon::prelude::*;

use super::fast;
use super::table::FreqTable;
use crate::error::{Error, Result};

/// Rows per tile: one rANS state (lane) per row.
pub const LANES: usize = 32;
/// Lower bound of the normalized state interval, `L = 2^16`; also every state's initial and final value.
pub const STATE_LOWER: u32 = 1 << 16;

/// How a `rows x cols` matrix of `bits`-bit symbols is cut into tiles and joint symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileLayout {
    rows: usize,
    cols: usize,
    bits: u32,
    segment: usize,
}

/// One tile's place in the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// First row (lane 0).
    pub row0: usize,
    /// Active lanes, `1..=32`: rows past the end of the matrix are inactive.
    pub rows: usize,
    /// First column of the segment.
    pub col0: usize,
    /// Columns in the segment (the last segment may be shorter).
    pub cols: usize,
}

impl TileLayout {
    /// A layout for `rows x cols` symbols of `bits` bits, with segments of `segment` columns.
    ///
    /// `segment` and `cols` must be multiples of [`weights_per_symbol`](Self::weights_per_symbol).
    pub fn new(rows: usize, cols: usize, bits: u32, segment: usize) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return Err(Error::param("bits", format!("{bits} is outside 1..=8")));
        }
        let k = (8 / bits) as usize;
        if segment == 0 || segment % k != 0 {
            return Err(Error::param("segment", format!("{segment} must be a positive multiple of {k}")));
        }
        if cols % k != 0 {
            return Err(Error::param("cols", format!("{cols} must be a multiple of {k} for {bits}-bit symbols")));
        }
        rows.checked_mul(cols).ok_or_else(|| Error::param("shape", "rows * cols overflows"))?;
        Ok(Self { rows, cols, bits, segment })
    }

    /// Rows `N` (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns `K` (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bits per weight symbol.
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Columns per segment `S`.
    pub fn segment(&self) -> usize {
        self.segment
    }
    /// Weights per joint symbol, `k = floor(8 / bits)`: pairs for 4-bit, quads for 2-bit, single above 4.
    pub fn weights_per_symbol(&self) -> usize {
        (8 / self.bits) as usize
    }
    /// Size of the joint-symbol alphabet, `2^(bits * k)`.
    pub fn alphabet(&self) -> usize {
        1 << (self.bits as usize * self.weights_per_symbol())
    }
    /// Tiles along the rows, `ceil(N / 32)`.
    pub fn row_tiles(&self) -> usize {
        self.rows.div_ceil(LANES)
    }
    /// Segments along the columns, `ceil(K / S)`.
    pub fn segments(&self) -> usize {
        self.cols.div_ceil(self.segment)
    }
    /// Total tiles, stored in row-tile-major order: tile `i` is row tile `i / segments`, segment `i % segments`.
    pub fn tiles(&self) -> usize {
        self.row_tiles() * self.segments()
    }
    /// Where tile `index` lies.
    pub fn tile(&self, index: usize) -> Tile {
        let (rt, seg) = (index / self.segments(), index % self.segments());
        let row0 = rt * LANES;
        let col0 = seg * self.segment;
        Tile { row0, rows: (self.rows - row0).min(LANES), col0, cols: (self.cols - col0).min(self.segment) }
    }
}

/// The encoded symbol stream of one matrix: what the container stores as `words`, `tile_offsets`, `states`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedStream {
    /// All tiles' words, tile after tile, each tile's words in decode order.
    pub words: Vec<u16>,
    /// Start of each tile in `words`, plus the total: `tiles + 1` entries, non-decreasing.
    pub tile_offsets: Vec<u32>,
    /// The 32 initial decoder states of each tile (`tiles * 32`); inactive lanes hold `2^16`.
    pub states: Vec<u32>,
}

/// Joint symbol at `row`, starting at column `col`: weight `i` of the group sits in bits `i*bits..`.
#[inline(always)]
fn joint(symbols: &[u8], cols: usize, bits: u32, k: usize, row: usize, col: usize) -> usize {
    let base = row * cols + col;
    let mut j = 0usize;
    for i in 0..k {
        j |= (symbols[base + i] as usize) << (i as u32 * bits);
    }
    j
}

/// Histogram of the joint symbols of `symbols` (row-major, `rows * cols`) under `layout`.
pub fn joint_counts(symbols: &[u8], layout: &TileLayout) -> Result<Vec<u64>> {
    check_symbols(symbols, layout)?;
    let k = layout.weights_per_symbol();
    let mut counts = vec![0u64; layout.alphabet()];
    for row in symbols.chunks_exact(layout.cols.max(1)).take(layout.rows) {
        for group in row.chunks_exact(k) {
            let mut j = 0usize;
            for (i, &q) in group.iter().enumerate() {
                j |= (q as usize) << (i as u32 * layout.bits);
            }
            counts[j] += 1;
        }
    }
    Ok(counts)
}

fn check_symbols(symbols: &[u8], layout: &TileLayout) -> Result<()> {
    if symbols.len() != layout.rows * layout.cols {
        return Err(Error::ShapeMismatch {
            what: "symbols".into(),
            expected: layout.rows * layout.cols,
            actual: symbols.len(),
        });
    }
    let max = (1u32 << layout.bits) - 1;
    // A branch-free maximum first (it vectorizes); the search for the culprit only runs on bad input.
    if symbols.iter().fold(0u8, |m, &q| m.max(q)) as u32 > max {
        let bad = symbols.iter().find(|&&q| q as u32 > max).copied().unwrap_or(0);
        return Err(Error::param("symbols", format!("symbol {bad} does not fit in {} bits", layout.bits)));
    }
    Ok(())
}

fn check_table(layout: &TileLayout, table: &FreqTable) -> Result<()> {
    if table.alphabet() != layout.alphabet() {
        return Err(Error::ShapeMismatch {
            what: "frequency table".into(),
            expected: layout.alphabet(),
            actual: table.alphabet(),
        });
    }
    Ok(())
}

/// Which implementation runs the tile loops. All give identical results; [`Kernel::Reference`] is the plain
/// scalar loop of the format description that every other implementation is tested against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// The scalar reference loops: division in the encoder, one lane at a time in the decoder.
    Reference,
    /// The fastest loops this CPU supports: the reciprocal encoder, and the AVX2 decoder where the CPU has AVX2
    /// (detected at run time; the reference decoder elsewhere).
    #[default]
    Fast,
}

impl Kernel {
    /// Every kernel, for tests and benchmarks that compare them.
    pub const ALL: [Kernel; 2] = [Kernel::Reference, Kernel::Fast];

    /// The decoder this kernel runs on this CPU: `"avx2"` or `"scalar"`.
    pub fn decoder_name(self) -> &'static str {
        match self.decoder() {
            Decoder::Avx2 => "avx2",
            Decoder::Scalar => "scalar",
        }
    }

    /// The encoder this kernel runs: `"reciprocal"` or `"division"`.
    pub fn encoder_name(self) -> &'static str {
        match self {
            Kernel::Reference => "division",
            Kernel::Fast => "reciprocal",
        }
    }

    fn decoder(self) -> Decoder {
        match self {
            Kernel::Fast if avx2_available() => Decoder::Avx2,
            _ => Decoder::Scalar,
        }
    }
}

/// The decoder a [`Kernel`] resolves to on this CPU.
#[derive(Clone, Copy)]
enum Decoder {
    Scalar,
    Avx2,
}

/// Whether this CPU can run the AVX2 routines (`avx2.rs`): the tile decoder and the split merge.
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2_available() -> bool {
    super::avx2::available()
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn avx2_available() -> bool {
    false
}

/// Encodes `symbols` (row-major `rows x cols`, each `< 2^bits`) tile by tile, in parallel.
///
/// The output is byte-identical whatever the number of threads: tiles are encoded independently and
/// concatenated in tile order. Every joint symbol present must have a nonzero frequency in `table`.
pub fn encode(symbols: &[u8], layout: &TileLayout, table: &FreqTable) -> Result<EncodedStream> {
    encode_with(symbols, layout, table, Kernel::Fast)
}

/// [`encode`] with a chosen [`Kernel`]; every kernel gives the same stream.
pub fn encode_with(symbols: &[u8], layout: &TileLayout, table: &FreqTable, kernel: Kernel) -> Result<EncodedStream> {
    check_symbols(symbols, layout)?;
    check_table(layout, table)?;
    let enc = match kernel {
        Kernel::Reference => Vec::new(),
        Kernel::Fast => fast::encoder_symbols(table),
    };
    let per_tile: Vec<EncodedTile> = (0..layout.tiles())
        .into_par_iter()
        .map(|i| match kernel {
            Kernel::Reference => encode_tile(symbols, layout, table, layout.tile(i)),
            Kernel::Fast => fast::encode_tile(symbols, layout, &enc, table.precision(), layout.tile(i)),
        })
        .collect::<Result<_>>()?;
    let total: usize = per_tile.iter().map(|t| t.words.len() - t.start).sum();
    if total > u32::MAX as usize {
        return Err(Error::param("shape", "more than 2^32 words in one tensor; split the tensor"));
    }
    let mut out = EncodedStream {
        words: Vec::with_capacity(total),
        tile_offsets: Vec::with_capacity(per_tile.len() + 1),
        states: Vec::with_capacity(per_tile.len() * LANES),
    };
    for t in per_tile {
        out.tile_offsets.push(out.words.len() as u32);
        out.words.extend_from_slice(&t.words[t.start..]);
        out.states.extend_from_slice(&t.states);
    }
    out.tile_offsets.push(out.words.len() as u32);
    Ok(out)
}

/// One encoded tile: its words are `words[start..]`, in decode order.
pub(crate) struct EncodedTile {
    pub(crate) words: Vec<u16>,
    pub(crate) start: usize,
    pub(crate) states: [u32; LANES],
}

/// Scalar reference encoder of one tile.
fn encode_tile(symbols: &[u8], layout: &TileLayout, table: &FreqTable, tile: Tile) -> Result<EncodedTile> {
    let (bits, k, p) = (layout.bits, layout.weights_per_symbol(), table.precision());
    let (freqs, cums) = (table.freqs(), table.cum());
    let mut states = [STATE_LOWER; LANES];
    let steps = tile.cols / k;
    // Roughly one word per 16 bits of output; the estimate only sizes the allocation.
    let mut words = Vec::with_capacity(steps * tile.rows * k * layout.bits as usize / 16 + 1);
    for t in (0..steps).rev() {
        for lane in (0..tile.rows).rev() {
            let s = joint(symbols, layout.cols, bits, k, tile.row0 + lane, tile.col0 + t * k);
            let f = freqs[s];
            if f == 0 {
                return Err(Error::param("table", format!("joint symbol {s} occurs but has frequency 0")));
            }
            let mut x = states[lane];
            // x must stay below f * 2^(32-P) before encoding, or the result would not fit in 32 bits.
            if x as u64 >= (f as u64) << (32 - p) {
                words.push(x as u16);
                x >>= 16;
            }
            // x = C(s, x) = (x / f) * 2^P + x % f + c
            states[lane] = ((x / f) << p) + x % f + cums[s];
        }
    }
    words.reverse();
    Ok(EncodedTile { words, start: 0, states })
}

/// Decodes every tile back to symbols (row-major `rows x cols`), checking the end state of every lane and that
/// each tile consumes exactly its words.
pub fn decode(stream: &EncodedStream, layout: &TileLayout, table: &FreqTable) -> Result<Vec<u8>> {
    decode_with(stream, layout, table, Kernel::Fast)
}

/// [`decode`] with a chosen [`Kernel`]; every kernel gives the same symbols and finds the same faults.
pub fn decode_with(stream: &EncodedStream, layout: &TileLayout, table: &FreqTable, kernel: Kernel) -> Result<Vec<u8>> {
    let mut out = vec![0u8; layout.rows * layout.cols];
    decode_into_with(stream, layout, table, &mut out, kernel)?;
    Ok(out)
}

/// [`decode`] into a caller's buffer of `rows * cols` symbols.
pub fn decode_into(stream: &EncodedStream, layout: &TileLayout, table: &FreqTable, out: &mut [u8]) -> Result<()> {
    decode_into_with(stream, layout, table, out, Kernel::Fast)
}

/// [`decode_into`] with a chosen [`Kernel`].
pub fn decode_into_with(
    stream: &EncodedStream,
    layout: &TileLayout,
    table: &FreqTable,
    out: &mut [u8],
    kernel: Kernel,
) -> Result<()> {
    check_table(layout, table)?;
    check_stream_shape(stream, layout)?;
    if out.len() != layout.rows * layout.cols {
        return Err(Error::ShapeMismatch {
            what: "output".into(),
            expected: layout.rows * layout.cols,
            actual: out.len(),
        });
    }
    if out.is_empty() {
        return Ok(());
    }
    let dtable = DecodeTable::new(table);
    out.par_chunks_mut(LANES * layout.cols)
        .enumerate()
        .try_for_each(|(rt, rows_out)| decode_row_tile_with(stream, layout, &dtable, rt, rows_out, kernel))
}

/// The slot-indexed decode table of a [`FreqTable`] (see [`FreqTable::decode_table`]), built once per tensor.
#[derive(Clone, Debug)]
pub struct DecodeTable {
    precision: u32,
    entries: Vec<u32>,
}

impl DecodeTable {
    /// Builds the `2^P`-entry table.
    pub fn new(table: &FreqTable) -> Self {
        Self { precision: table.precision(), entries: table.decode_table() }
    }

    /// Probability precision `P`.
    pub fn precision(&self) -> u32 {
        self.precision
    }

    /// The `2^P` entries, `symbol | (freq - 1) << 8 | (slot - cum) << 20`.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }
}

/// Decodes all segments of row tile `row_tile` into `out`, its `active_rows * cols` symbols, row-major.
///
/// The stream should already have passed [`check_stream_shape`] for `layout`; the array lengths and offsets
/// this row tile uses are checked again here (so a bad stream gives an error, never a panic), and every tile's
/// end states and word count are checked.
pub fn decode_row_tile(
    stream: &EncodedStream,
    layout: &TileLayout,
    dtable: &DecodeTable,
    row_tile: usize,
    out: &mut [u8],
) -> Result<()> {
    decode_row_tile_with(stream, layout, dtable, row_tile, out, Kernel::Fast)
}

/// [`decode_row_tile`] with a chosen [`Kernel`]. Runs on the calling thread only.
pub fn decode_row_tile_with(
    stream: &EncodedStream,
    layout: &TileLayout,
    dtable: &DecodeTable,
    row_tile: usize,
    out: &mut [u8],
    kernel: Kernel,
) -> Result<()> {
    if row_tile >= layout.row_tiles() {
        return Err(Error::param("row_tile", format!("{row_tile} is past the last row tile ({})", layout.row_tiles())));
    }
    let segments = layout.segments();
    let active = (layout.rows - row_tile * LANES).min(LANES);
    if out.len() != active * layout.cols {
        return Err(Error::ShapeMismatch {
            what: "row tile output".into(),
            expected: active * layout.cols,
            actual: out.len(),
        });
    }
    let (first, last) = (row_tile * segments, (row_tile + 1) * segments);
    if stream.tile_offsets.len() != layout.tiles() + 1 {
        return Err(Error::ShapeMismatch {
            what: "tile_offsets".into(),
            expected: layout.tiles() + 1,
            actual: stream.tile_offsets.len(),
        });
    }
    if stream.states.len() != layout.tiles() * LANES {
        return Err(Error::ShapeMismatch {
            what: "states".into(),
            expected: layout.tiles() * LANES,
            actual: stream.states.len(),
        });
    }
    let offsets = &stream.tile_offsets[first..=last];
    for (i, pair) in offsets.windows(2).enumerate() {
        if pair[1] < pair[0] || pair[1] as usize > stream.words.len() {
            return Err(Error::CorruptStream {
                tile: first + i,
                reason: format!("tile spans words {}..{} of {}", pair[0], pair[1], stream.words.len()),
            });
        }
    }
    #[cfg(target_arch = "x86_64")]
    let simd = match kernel.decoder() {
        Decoder::Avx2 => Some(fast::SimdDecoder { steps: super::avx2::decode_steps, write: super::avx2::write_block }),
        Decoder::Scalar => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let simd: Option<()> = {
        let _ = kernel; // no SIMD decoder on this architecture: every kernel runs the reference loop
        None
    };
    #[cfg(target_arch = "x86_64")]
    let expand = fast::expand_table(layout.bits);
    for index in first..last {
        let (start, end) = (stream.tile_offsets[index] as usize, stream.tile_offsets[index + 1] as usize);
        let words = &stream.words[start..end];
        let states = &stream.states[index * LANES..(index + 1) * LANES];
        let tile = layout.tile(index);
        match simd {
            #[cfg(target_arch = "x86_64")]
            Some(simd) => {
                // SAFETY: `decoder()` chose these routines after detecting the CPU features they need (AVX2 and
                // POPCNT), and a DecodeTable always holds 2^P entries.
                unsafe {
                    fast::decode_tile(
                        simd,
                        states,
                        words,
                        layout,
                        tile,
                        index,
                        &dtable.entries,
                        dtable.precision,
                        &expand,
                        out,
                    )?
                }
            }
            _ => decode_tile(states, words, layout, tile, index, dtable.precision, &dtable.entries, out)?,
        }
    }
    Ok(())
}

/// Checks the array lengths, offsets and states of a stream against its layout, without decoding.
pub fn check_stream_shape(stream: &EncodedStream, layout: &TileLayout) -> Result<()> {
    let tiles = layout.tiles();
    let corrupt = |tile: usize, reason: String| Error::CorruptStream { tile, reason };
    if stream.tile_offsets.len() != tiles + 1 {
        return Err(Error::ShapeMismatch {
            what: "tile_offsets".into(),
            expected: tiles + 1,
            actual: stream.tile_offsets.len(),
        });
    }
    if stream.states.len() != tiles * LANES {
        return Err(Error::ShapeMismatch {
            what: "states".into(),
            expected: tiles * LANES,
            actual: stream.states.len(),
        });
    }
    if stream.tile_offsets[0] != 0 {
        return Err(corrupt(0, format!("first tile offset is {}, expected 0", stream.tile_offsets[0])));
    }
    if stream.tile_offsets[tiles] as usize != stream.words.len() {
        return Err(corrupt(
            tiles,
            format!("last tile offset {} != {} words", stream.tile_offsets[tiles], stream.words.len()),
        ));
    }
    for (i, pair) in stream.tile_offsets.windows(2).enumerate() {
        if pair[1] < pair[0] {
            return Err(corrupt(i, format!("tile offsets decrease ({} then {})", pair[0], pair[1])));
        }
    }
    for i in 0..tiles {
        let active = layout.tile(i).rows;
        for (lane, &x) in stream.states[i * LANES..(i + 1) * LANES].iter().enumerate() {
            if lane < active && x < STATE_LOWER {
                return Err(corrupt(i, format!("lane {lane} starts at state {x} < 2^16")));
            }
            if lane >= active && x != STATE_LOWER {
                return Err(corrupt(i, format!("inactive lane {lane} holds state {x}, expected 2^16")));
            }
        }
    }
    Ok(())
}

/// Scalar reference decoder of one tile (`index`, with its `states` and `words`) into `rows_out` (the row tile's
/// `rows * cols` output slice).
#[allow(clippy::too_many_arguments)]
fn decode_tile(
    states_in: &[u32],
    words: &[u16],
    layout: &TileLayout,
    tile: Tile,
    index: usize,
    precision: u32,
    dtable: &[u32],
    rows_out: &mut [u8],
) -> Result<()> {
    let (bits, k) = (layout.bits, layout.weights_per_symbol());
    let mask = (1u32 << precision) - 1;
    let sym_mask = (1u32 << bits) - 1;
    let mut states = [0u32; LANES];
    states.copy_from_slice(states_in);
    let mut pos = 0usize;
    for t in 0..tile.cols / k {
        let col = tile.col0 + t * k;
        for (lane, x) in states.iter_mut().enumerate().take(tile.rows) {
            let slot = *x & mask;
            let e = dtable[slot as usize];
            // e = symbol | (freq - 1) << 8 | (slot - cum) << 20; x = D(x) = freq * (x >> P) + slot - cum
            let (s, f, bias) = (e & 0xff, ((e >> 8) & 0xfff) + 1, e >> 20);
            *x = f * (*x >> precision) + bias;
            let base = lane * layout.cols + col;
            for i in 0..k {
                rows_out[base + i] = ((s >> (i as u32 * bits)) & sym_mask) as u8;
            }
        }
        for x in states.iter_mut().take(tile.rows) {
            if *x < STATE_LOWER {
                let Some(&w) = words.get(pos) else {
                    return Err(Error::CorruptStream { tile: index, reason: format!("ran out of words at step {t}") });
                };
                *x = *x << 16 | w as u32;
                pos += 1;
            }
        }
    }
    if pos != words.len() {
        return Err(Error::CorruptStream {
            tile: index,
            reason: format!("{} of {} words unused", words.len() - pos, words.len()),
        });
    }
    if let Some(lane) = states[..tile.rows].iter().position(|&x| x != STATE_LOWER) {
        return Err(Error::CorruptStream {
            tile: index,
            reason: format!("lane {lane} ends at {}, expected 2^16", states[lane]),
        });
    }
    Ok(())
}
