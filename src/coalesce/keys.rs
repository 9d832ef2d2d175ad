//! Key maps: keys hashed with a per-coalescer seed (clients choose keys, so they must not be able
//! to aim them at one bucket), xxh3 rather than SipHash for short keys.

use super::*;

/// One shard's keys. Keys come from clients, so their hash is seeded per coalescer (clients cannot
/// aim many keys at one bucket); xxh3 rather than the standard SipHash, which cost several hundred
/// instructions per write on short keys.
pub(super) type KeyMap = HashMap<Bytes, KeyQueue, KeyHashing>;

#[derive(Clone, Copy)]
pub(super) struct KeyHashing {
    pub(super) seed: u64,
}

impl KeyHashing {
    pub(super) fn random() -> KeyHashing {
        KeyHashing {
            seed: RandomState::new().hash_one(0u64),
        }
    }

    pub(super) fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed)
    }

    /// Which shard holds `key`: from a hash of its own, since the keys of one shard would
    /// otherwise share the low bits that pick their bucket in the shard's map.
    pub(super) fn shard(&self, key: &[u8]) -> usize {
        let seed = self.seed ^ 0x5851_F42D_4C95_7F2D;
        (xxhash_rust::xxh3::xxh3_64_with_seed(key, seed) as usize) % SHARDS
    }
}

impl BuildHasher for KeyHashing {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            hashing: *self,
            hash: 0,
        }
    }
}

pub(super) struct KeyHasher {
    pub(super) hashing: KeyHashing,
    pub(super) hash: u64,
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.hash ^= self.hashing.hash(bytes);
    }

    /// A key's length prefix: mixed in without a hash call of its own.
    fn write_usize(&mut self, n: usize) {
        self.hash ^= (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}
