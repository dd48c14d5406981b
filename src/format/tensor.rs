//! [`EcTensor`]: one encoded weight matrix, its parameters and its arrays.

use crate::error::{Error, Result};
use crate::quant::{QuantizedMatrix, ScaleDtype};
use crate::rans::{self, DecodeTable, EncodedStream, FreqTable, SplitForm, TileLayout};

/// Encoder settings: segment width `S`, probability precision `P`, and whether and how 4-bit symbols are split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Columns per segment, rounded up to a multiple of the group size and capped at the matrix width; `0`
    /// (the default) picks it from the shape (see [`EncodeOptions::segment_for`]).
    pub segment: usize,
    /// Probability precision `P` of the frequency table, `1..=12`.
    pub precision: u32,
    /// Split 4-bit symbols: code part of each weight and store the rest as it is (docs/FORMAT.md, sections 2.1
    /// and 2.2). [`SplitForm::Low2`] codes the high 2 bits, four weights a step (half the decode steps), and needs
    /// columns and segment multiples of 16; [`SplitForm::Low3`] codes one bit, eight weights a step (a quarter of
    /// the decode steps), and needs multiples of 32. On SmolLM2-135M's 4-bit tensors `Low2` costs 0.6-1.1% of the
    /// stream and `Low3` 0.7-1.6%; on the gemv example's heavy-tailed layer 0.9% and 2.6% (BENCHMARKS.md). `None`
    /// (the default) codes whole symbols; ignored for widths other than 4.
    pub split: Option<SplitForm>,
    /// With `segment == 0`: the fewest tiles a matrix should have, reached by halving its segments, though none
    /// shorter than [`rans::MIN_AUTO_SEGMENT`] columns (see [`EncodeOptions::segment_for`]); `0` (the default) keeps
    /// the shape rule alone, the smallest stream. Each tile is a chain of decode steps that runs alone, so a matrix of
    /// few row tiles leaves a large GPU with too few chains to hide a step's latency: on an NVIDIA H100, `2048`
    /// takes a 4096 x 4096 matrix from 1024 tiles to 2048 and its fused product at one vector from 22.7 to 16.9 us
    /// split with one coded bit ([`SplitForm::Low3`]), from 47.6 to 34.7 us not split, for a stream 1.3% larger; on
    /// an NVIDIA H200, `3072` takes it to 4096 tiles of 128 columns and that product from 16.4 to 14.4 us, for a
    /// stream 3.8% larger than at the default (BENCHMARKS.md). Matrices that already have that many tiles keep their
    /// segments.
    pub min_tiles: usize,
}

impl EncodeOptions {
    /// The segment width used for a matrix of `rows` x `cols` weights and groups of `group_size`.
    ///
    /// With `segment == 0` each row is split into `max(1, round(K / 512))` equal segments
    /// ([`rans::DEFAULT_SEGMENT`]), each rounded up to whole groups, so no row pays a whole 32-bit state for a
    /// short leftover segment. Measured on SmolLM2-135M's 576-column tensors: `S = 512` leaves 64-column
    /// segments and costs +2.4% over the entropy, the even split (`S = 576`) +1.3%. Where that gives fewer than
    /// `min_tiles` tiles (row tiles of [`rans::LANES`] rows times segments), the segments are halved, again and
    /// again, until the matrix has `min_tiles` tiles or one more halving would take them below
    /// [`rans::MIN_AUTO_SEGMENT`] columns; each is rounded up to whole groups as above, which can leave fewer
    /// segments than that. With `min_tiles`, a row of more than [`rans::EVEN_PARTS_ABOVE`] segments first takes
    /// the power of two nearest their count (by ratio), so that it splits into halves, quarters and eighths of
    /// whole segments. Halving keeps segments of equal width equal: on an NVIDIA H200 a 4096 x 4096 matrix in
    /// 22 segments of 192 columns (the last 64 wide; what splitting into as many equal segments as reach 3072
    /// tiles gave) took 16.4 us at one vector, in 32 of 128 columns 14.4 (BENCHMARKS.md, "Shorter segments for
    /// 4096x4096"). Otherwise `segment` rounded up to whole groups and capped at `cols` rounded up to a group.
    pub fn segment_for(&self, rows: usize, cols: usize, group_size: usize) -> usize {
        let group_size = group_size.max(1);
        let whole_groups = |c: usize| c.div_ceil(group_size).max(1) * group_size;
        if self.segment == 0 {
            let target = rans::DEFAULT_SEGMENT;
            let mut segments = ((cols + target / 2) / target).max(1);
            if self.min_tiles > 0 && segments > rans::EVEN_PARTS_ABOVE {
                // The power of two nearest by ratio: up where up / segments < segments / down.
                let up = segments.next_power_of_two();
                segments = if up * (up / 2) < segments * segments { up } else { up / 2 };
            }
            let row_tiles = rows.div_ceil(rans::LANES).max(1);
            while row_tiles * segments < self.min_tiles && cols / (2 * segments) >= rans::MIN_AUTO_SEGMENT {
                segments *= 2;
            }
            whole_groups(cols.div_ceil(segments))
        } else {
            whole_groups(self.segment).min(whole_groups(cols))
        }
    }
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self { segment: 0, precision: rans::DEFAULT_PRECISION, split: None, min_tiles: 0 }
    }
}

/// One encoded weight matrix: the rANS symbol stream plus per-group scales and biases.
///
/// Invariants (checked by every constructor): the stream matches the layout (offsets, states), the table
/// covers the layout's joint alphabet, `segment % group_size == 0`, and scales and biases hold
/// `rows * cols / group_size` values exactly representable in `scale_dtype`. A split tensor (4-bit weights of which
/// 2 or 3 bits are stored as they are, [`SplitForm`]) codes the rest: its layout has the form's coded bits (2 or 1),
/// columns and segment are multiples of the form's block, and it holds the form's low words, 0 for rows past the
/// last.
#[derive(Clone, Debug, PartialEq)]
pub struct EcTensor {
    layout: TileLayout,
    group_size: usize,
    table: FreqTable,
    stream: EncodedStream,
    scales: Vec<f32>,
    biases: Vec<f32>,
    scale_dtype: ScaleDtype,
    /// The low words of a split tensor ([`SplitForm::low_words`] of them); `None` for an unsplit one.
    low: Option<Vec<u32>>,
}

impl EcTensor {
    /// Encodes a quantized matrix. The segment is rounded up to a multiple of the group size and capped at
    /// the matrix width rounded up to a group.
    pub fn encode(q: &QuantizedMatrix, options: EncodeOptions) -> Result<Self> {
        q.validate()?;
        let segment = options.segment_for(q.rows, q.cols, q.group_size);
        let split = options.split.filter(|_| q.bits == rans::SPLIT_BITS);
        let (coded, low) = if let Some(form) = split {
            // (A segment that is not a multiple of the block is refused by `from_parts`.)
            let (high, low) = rans::split_symbols(&q.symbols, q.rows, q.cols, form)?;
            (std::borrow::Cow::Owned(high), Some(low))
        } else {
            (std::borrow::Cow::Borrowed(&q.symbols[..]), None)
        };
        let coded_bits = split.map_or(q.bits, SplitForm::coded_bits);
        let layout = TileLayout::new(q.rows, q.cols, coded_bits, segment)?;
        let counts = rans::joint_counts(&coded, &layout)?;
        let table = FreqTable::from_counts(&counts, options.precision)?;
        let stream = rans::encode(&coded, &layout, &table)?;
        let (scales, biases) = (q.scales.clone(), q.biases.clone());
        Self::from_parts(layout, q.group_size, table, stream, scales, biases, q.scale_dtype, low)
    }

    /// Assembles a tensor from its parts after checking every invariant (used by readers). `low` holds the low
    /// words of a split tensor, whose `layout` then describes the coded symbols: 2 bits for [`SplitForm::Low2`], 1
    /// for [`SplitForm::Low3`].
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        layout: TileLayout,
        group_size: usize,
        table: FreqTable,
        stream: EncodedStream,
        scales: Vec<f32>,
        biases: Vec<f32>,
        scale_dtype: ScaleDtype,
        low: Option<Vec<u32>>,
    ) -> Result<Self> {
        if group_size == 0 || layout.cols() % group_size != 0 || layout.segment() % group_size != 0 {
            return Err(Error::param(
                "group_size",
                format!(
                    "{group_size} must divide both the columns ({}) and the segment ({})",
                    layout.cols(),
                    layout.segment()
                ),
            ));
        }
        if table.alphabet() != layout.alphabet() {
            return Err(Error::ShapeMismatch {
                what: "frequency table".into(),
                expected: layout.alphabet(),
                actual: table.alphabet(),
            });
        }
        rans::check_stream_shape(&stream, &layout)?;
        if let Some(low) = &low {
            let Some(form) = SplitForm::from_coded_bits(layout.bits()) else {
                return Err(Error::param(
                    "bits",
                    format!("a split tensor codes 2-bit or 1-bit symbols, not {}-bit ones", layout.bits()),
                ));
            };
            form.check_shape(layout.cols(), layout.segment())?;
            let words = form.low_words(layout.rows(), layout.cols());
            if low.len() != words {
                return Err(Error::ShapeMismatch { what: "low words".into(), expected: words, actual: low.len() });
            }
            // Rows past the last hold 0 (docs/FORMAT.md, sections 2.1 and 2.2).
            let blocks = layout.cols() / form.block();
            for row in layout.rows()..layout.rows().div_ceil(rans::LANES) * rans::LANES {
                let word_of = |b: usize| (0..form.block_words()).map(move |k| (b, k));
                if let Some((b, k)) =
                    (0..blocks).flat_map(word_of).find(|&(b, k)| low[form.low_index(row, b, k, layout.cols())] != 0)
                {
                    return Err(Error::param(
                        "low",
                        format!("low word {k} of row {row} (past the last), block {b}, is not 0"),
                    ));
                }
            }
        }
        let groups = layout.rows() * (layout.cols() / group_size);
        for (what, v) in [("scales", &scales), ("biases", &biases)] {
            if v.len() != groups {
                return Err(Error::ShapeMismatch { what: what.into(), expected: groups, actual: v.len() });
            }
            if let Some(x) = v.iter().find(|&&x| scale_dtype.round(x).to_bits() != x.to_bits()) {
                return Err(Error::param(what, format!("{x} is not representable in {}", scale_dtype.name())));
            }
        }
        Ok(Self { layout, group_size, table, stream, scales, biases, scale_dtype, low })
    }

    /// Decodes the symbols (row-major `rows * cols`), checking end states.
    pub fn decode_symbols(&self) -> Result<Vec<u8>> {
        let mut symbols = rans::decode(&self.stream, &self.layout, &self.table)?;
        if let (Some(low), Some(form)) = (&self.low, self.split()) {
            rans::merge_symbols(&mut symbols, 0, self.cols(), low, form)?;
        }
        Ok(symbols)
    }

    /// Decodes row tile `row_tile` into `out`, its `active_rows * cols` symbols, row-major (see
    /// [`rans::decode_row_tile`]; `dtable` is this tensor's table).
    pub fn decode_row_tile(&self, dtable: &DecodeTable, row_tile: usize, out: &mut [u8]) -> Result<()> {
        rans::decode_row_tile(&self.stream, &self.layout, dtable, row_tile, out)?;
        if let (Some(low), Some(form)) = (&self.low, self.split()) {
            rans::merge_symbols(out, row_tile * rans::LANES, self.cols(), low, form)?;
        }
        Ok(())
    }

    /// Decodes back to the quantized matrix this tensor was encoded from.
    pub fn to_quantized(&self) -> Result<QuantizedMatrix> {
        Ok(QuantizedMatrix {
            rows: self.rows(),
            cols: self.cols(),
            bits: self.bits(),
            group_size: self.group_size,
            symbols: self.decode_symbols()?,
            scales: self.scales.clone(),
            biases: self.biases.clone(),
            scale_dtype: self.scale_dtype,
        })
    }

    /// Rows `N` (output features).
    pub fn rows(&self) -> usize {
        self.layout.rows()
    }
    /// Columns `K` (input features).
    pub fn cols(&self) -> usize {
        self.layout.cols()
    }
    /// Bits per weight symbol.
    pub fn bits(&self) -> u32 {
        if self.low.is_some() {
            rans::SPLIT_BITS
        } else {
            self.layout.bits()
        }
    }
    /// The low words of a split tensor ([`SplitForm::low_index`]; docs/FORMAT.md sections 2.1 and 2.2); `None`
    /// when the tensor is not split.
    pub fn low(&self) -> Option<&[u32]> {
        self.low.as_deref()
    }
    /// How the tensor is split, or `None` when it is not.
    pub fn split(&self) -> Option<SplitForm> {
        self.low.as_ref().and_then(|_| SplitForm::from_coded_bits(self.layout.bits()))
    }
    /// Columns per scale/bias group.
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    /// The tile layout of the coded symbols (rows, columns, bits, segment): 2 or 1 bits for a split tensor.
    pub fn layout(&self) -> &TileLayout {
        &self.layout
    }
    /// The normalized frequency table.
    pub fn table(&self) -> &FreqTable {
        &self.table
    }
    /// The encoded symbol stream.
    pub fn stream(&self) -> &EncodedStream {
        &self.stream
    }
    /// Per-group scales, row-major `rows x cols / group_size`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Per-group biases, row-major `rows x cols / group_size`.
    pub fn biases(&self) -> &[f32] {
        &self.biases
    }
    /// Storage dtype of scales and biases.
    pub fn scale_dtype(&self) -> ScaleDtype {
        self.scale_dtype
    }

    /// Stored size of the symbols in bits: words, states, tile offsets, the frequency table and a split tensor's
    /// low words (scales and biases are not included; see [`scale_bits`](Self::scale_bits)).
    pub fn stream_bits(&self) -> u64 {
        let s = &self.stream;
        32 * self.low.as_ref().map_or(0, |l| l.len()) as u64
            + 16 * s.words.len() as u64
            + 32 * s.states.len() as u64
            + 32 * s.tile_offsets.len() as u64
            + 16 * self.table.alphabet() as u64
    }

    /// Stored size of scales and biases in bits.
    pub fn scale_bits(&self) -> u64 {
        8 * self.scale_dtype.size() as u64 * (self.scales.len() + self.biases.len()) as u64
    }
}
