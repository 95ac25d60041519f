//! Latency histogram: fixed relative error, cheap to record and to merge across receivers.

/// Log-linear histogram of microseconds: exact below 64 µs, then 32 buckets per power of two
/// (≤ 3 % error). Grows on demand, so idle receivers cost nothing.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // ≥ SUB_BITS + 1
        let mantissa = (v >> (exp - SUB_BITS)) - SUB;
        (2 * SUB + u64::from(exp - SUB_BITS - 1) * SUB + mantissa) as usize
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let j = i - 2 * SUB;
        let shift = j / SUB + 1;
        ((SUB + j % SUB + 1) << shift) - 1
    }

    pub fn record(&mut self, v: u64) {
        let i = Self::index(v);
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The q-quantile in milliseconds (bucket upper bound, capped at the true maximum).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper(i).min(self.max) as f64 / 1000.0;
            }
        }
        self.max as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 12_345, 1 << 30] {
            let i = Histogram::index(v);
            assert!(i >= last);
            last = i;
            let upper = Histogram::upper(i);
            assert!(upper >= v, "{v} → bucket {i} upper {upper}");
            assert!((upper - v) as f64 <= v as f64 * 0.04 + 1.0);
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for v in 1..=1000 {
            h.record(v * 1000);
        }
        assert!((h.quantile_ms(0.5) - 500.0).abs() < 20.0);
        assert!((h.quantile_ms(0.99) - 990.0).abs() < 40.0);
        assert_eq!(h.quantile_ms(1.0), 1000.0);
    }
}
