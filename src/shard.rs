//! Spreading sessions over independently locked shards (the cache and the access buffer), so
//! that no lock on the hot path is process-wide.

use uuid::Uuid;

/// Keeps each shard's lock on its own cache line so that two threads working on different
/// shards do not slow each other down through false sharing.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub T);

/// Spread ids over `n` (a power of two) shards. Ids come from clients, so the mix is keyed with
/// a per-process random seed.
#[derive(Clone, Copy)]
pub(crate) struct ShardPicker {
    seed: u64,
    mask: usize,
}

impl ShardPicker {
    pub(crate) fn new(shards: usize) -> ShardPicker {
        debug_assert!(shards.is_power_of_two());
        ShardPicker {
            seed: Uuid::new_v4().as_u64_pair().0 | 1,
            mask: shards - 1,
        }
    }

    #[inline]
    pub(crate) fn pick(&self, id: &Uuid) -> usize {
        let (hi, lo) = id.as_u64_pair();
        let h = (hi ^ lo.rotate_left(17) ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (h >> 40) as usize & self.mask
    }
}

/// A reasonable shard count: a few per core, a power of two, never more than the capacity.
pub(crate) fn shard_count(capacity: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    (cores * 8)
        .next_power_of_two()
        .clamp(1, 64)
        .min(capacity.max(1).next_power_of_two())
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_picker_spreads_ids() {
        let picker = ShardPicker::new(16);
        let mut counts = [0usize; 16];
        for _ in 0..16_000 {
            counts[picker.pick(&Uuid::new_v4())] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }
}
