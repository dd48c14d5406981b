//! Normalized frequency tables: symbol counts -> frequencies summing to `2^P`, and the decode table.

use crate::error::{Error, Result};

/// Largest supported probability precision. `2^12` decode-table entries of `u32` are 16 KiB, which fits in
/// workgroup memory on every GPU ecq targets; the 12-bit `slot - cum` and `freq - 1` fields of a decode
/// entry also need `P <= 12`.
pub const MAX_PRECISION: u32 = 12;

/// Default probability precision. `P = 11` stores a little more than `P = 12` (0.04 points over the entropy on a
/// 4096 x 4096 4-bit group-64 layer; SmolLM2-135M's file 0.012% larger) but halves the decode table to 8 KiB, and
/// GPUs keep fewer workgroups resident the more workgroup memory each holds: on an H200 and an H100
/// (BENCHMARKS.md) a 16 KiB table held the decode kernel to 3 workgroups per SM, and with an 8 KiB one all 448
/// of a 14336 x 4096 matrix ran at once, 18% and 15% faster.
pub const DEFAULT_PRECISION: u32 = 11;

/// A normalized frequency table over a joint-symbol alphabet of at most 256 symbols.
///
/// Invariants: `freqs.len() == alphabet`, `sum(freqs) == 1 << precision`, `cum[s] == sum(freqs[..s])`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreqTable {
    precision: u32,
    freqs: Vec<u32>,
    cum: Vec<u32>,
}

impl FreqTable {
    /// Builds the table that minimizes the coded size `sum(count[s] * -log2(freq[s] / 2^P))` subject to
    /// `sum(freq) == 2^P` and `freq[s] >= 1` wherever `count[s] > 0`. Symbols with count 0 get frequency 0.
    ///
    /// With no symbols at all (an empty tensor) symbol 0 gets the whole range, so the table stays valid.
    pub fn from_counts(counts: &[u64], precision: u32) -> Result<Self> {
        check_precision(precision)?;
        check_alphabet(counts.len())?;
        let total_range = 1u64 << precision;
        let present = counts.iter().filter(|&&c| c > 0).count() as u64;
        if present > total_range {
            return Err(Error::param(
                "precision",
                format!("{present} distinct symbols do not fit in 2^{precision} slots; raise the precision"),
            ));
        }
        let mut freqs = vec![0u32; counts.len()];
        let total: u64 = counts.iter().sum();
        if total == 0 {
            freqs[0] = total_range as u32;
            return Self::from_freqs(freqs, precision);
        }

        // Start from the proportional share, rounded down, never below 1 for a present symbol.
        for (f, &c) in freqs.iter_mut().zip(counts) {
            if c > 0 {
                *f = ((c as u128 * total_range as u128 / total as u128) as u32).max(1);
            }
        }
        // The cost is separable and convex in each frequency, so moving single units by best marginal
        // gain reaches the integer optimum: first fix the sum, then swap while a swap still pays.
        let gain_up = |c: u64, f: u32| c as f64 * ((f as f64 + 1.0).log2() - (f as f64).log2());
        let loss_down = |c: u64, f: u32| {
            if f <= 1 {
                f64::INFINITY
            } else {
                c as f64 * ((f as f64).log2() - (f as f64 - 1.0).log2())
            }
        };
        let best_up = |freqs: &[u32]| {
            (0..freqs.len())
                .filter(|&s| counts[s] > 0)
                .max_by(|&a, &b| gain_up(counts[a], freqs[a]).total_cmp(&gain_up(counts[b], freqs[b])))
        };
        let best_down = |freqs: &[u32]| {
            (0..freqs.len())
                .filter(|&s| counts[s] > 0 && freqs[s] > 1)
                .min_by(|&a, &b| loss_down(counts[a], freqs[a]).total_cmp(&loss_down(counts[b], freqs[b])))
        };
        let mut sum: u64 = freqs.iter().map(|&f| f as u64).sum();
        while sum < total_range {
            let s = best_up(&freqs).expect("a present symbol exists");
            freqs[s] += 1;
            sum += 1;
        }
        while sum > total_range {
            let s = best_down(&freqs).expect("sum > 2^P with every present symbol >= 1 leaves one above 1");
            freqs[s] -= 1;
            sum -= 1;
        }
        while let (Some(up), Some(down)) = (best_up(&freqs), best_down(&freqs)) {
            if up == down || gain_up(counts[up], freqs[up]) <= loss_down(counts[down], freqs[down]) * (1.0 + 1e-12) {
                break;
            }
            freqs[up] += 1;
            freqs[down] -= 1;
        }
        Self::from_freqs(freqs, precision)
    }

    /// Wraps stored frequencies after checking every invariant (used when reading a file).
    pub fn from_freqs(freqs: Vec<u32>, precision: u32) -> Result<Self> {
        check_precision(precision)?;
        check_alphabet(freqs.len())?;
        let sum: u64 = freqs.iter().map(|&f| f as u64).sum();
        if sum != 1u64 << precision {
            return Err(Error::param("freqs", format!("frequencies sum to {sum}, expected 2^{precision}")));
        }
        let mut cum = Vec::with_capacity(freqs.len());
        let mut acc = 0u32;
        for &f in &freqs {
            cum.push(acc);
            acc += f;
        }
        Ok(Self { precision, freqs, cum })
    }

    /// Probability precision `P`: frequencies sum to `2^P`.
    pub fn precision(&self) -> u32 {
        self.precision
    }

    /// Number of joint symbols the table covers.
    pub fn alphabet(&self) -> usize {
        self.freqs.len()
    }

    /// Frequency of every joint symbol.
    pub fn freqs(&self) -> &[u32] {
        &self.freqs
    }

    /// Cumulative frequency below every joint symbol.
    pub fn cum(&self) -> &[u32] {
        &self.cum
    }

    /// The decode table: one `u32` per slot in `0..2^P`, packed as
    /// `symbol | (freq - 1) << 8 | (slot - cum) << 20`. This exact layout is what the GPU kernels load.
    pub fn decode_table(&self) -> Vec<u32> {
        let mut table = Vec::with_capacity(1 << self.precision);
        for (s, (&f, &c)) in self.freqs.iter().zip(&self.cum).enumerate() {
            for slot in c..c + f {
                table.push(s as u32 | (f - 1) << 8 | (slot - c) << 20);
            }
        }
        table
    }

    /// Exact coded size in bits of symbols with these counts under this table (no renormalization slack).
    pub fn cost_bits(&self, counts: &[u64]) -> f64 {
        counts
            .iter()
            .zip(&self.freqs)
            .filter(|(&c, _)| c > 0)
            .map(|(&c, &f)| c as f64 * (self.precision as f64 - (f as f64).log2()))
            .sum()
    }
}

fn check_precision(precision: u32) -> Result<()> {
    if !(1..=MAX_PRECISION).contains(&precision) {
        return Err(Error::param("precision", format!("{precision} is outside 1..={MAX_PRECISION}")));
    }
    Ok(())
}

fn check_alphabet(len: usize) -> Result<()> {
    if !(1..=256).contains(&len) {
        return Err(Error::param("alphabet", format!("{len} symbols; joint alphabets have 1..=256")));
    }
    Ok(())
}

/// Order-0 entropy in bits per symbol of a histogram (0 for an empty or one-symbol histogram).
pub fn entropy_bits(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / t) * (c as f64 / t).log2()).sum::<f64>().max(0.0)
}
