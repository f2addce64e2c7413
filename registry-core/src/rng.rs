//! A small seeded pseudo-random generator (SplitMix64) for everything that must be
//! reproducible from a seed: fixture content, seeded upload ids, fault injection.
//!
//! Not cryptographic, and not meant to be: seeded ids are for tests (see
//! [`RegistryBuilder::with_id_seed`](crate::RegistryBuilder::with_id_seed)). SplitMix64
//! is a few lines, passes BigCrush, and any seed (0 included) is a good one, so the core
//! needs no `rand` dependency for it.

/// SplitMix64 (Steele, Lea, Flood 2014; the generator Java's `SplittableRandom` uses).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniformly in `[0, 1)` (53 random bits).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A number uniformly in `[0, n)`; 0 when `n` is 0.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift (Lemire): no modulo bias worth the name for test sizes.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fills `buf` with pseudo-random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&self.next_u64().to_le_bytes()[..n]);
        }
    }
}

/// Mixes several values into one seed, so that derived streams (layer 3 of image seed
/// 7, say) are independent of each other and of the parent stream.
pub(crate) fn derive(parts: &[u64]) -> u64 {
    let mut h = SplitMix64::new(0x005E_ED0F_F1C7_u64);
    let mut acc = 0u64;
    for &p in parts {
        h.0 ^= p.wrapping_add(acc);
        acc = h.next_u64();
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_derivations_differ() {
        let a: Vec<u64> = {
            let mut r = SplitMix64::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = SplitMix64::new(7);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(derive(&[7, 0]), derive(&[7, 1]));
        assert_ne!(derive(&[7, 1]), derive(&[1, 7]));
        let mut r = SplitMix64::new(1);
        for _ in 0..1000 {
            assert!(r.below(10) < 10);
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
        let mut buf = [0u8; 13];
        r.fill(&mut buf);
        assert!(buf.iter().any(|&b| b != 0));
    }
}
