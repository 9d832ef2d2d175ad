//! `hash_algorithm = "ketama"`: the ring nginx builds for `hash $key consistent`, point for point,
//! so that moving from nginx to writegate keeps every key on the backend it was on.
//!
//! As in nginx's upstream hash module: each backend's address, as written in the config, is split
//! into host and port at the last ':' followed only by digits; its base hash is CRC-32 over
//! `host`, one zero byte and `port`; it gets 160 points per unit of weight, each the CRC-32 of the
//! base state extended with the previous point's hash (4 bytes, little-endian; 0 for the first).
//! Points are sorted and duplicates dropped; a key (CRC-32 of its bytes) belongs to the first point
//! at or after its hash, wrapping around. The fallback order walks the ring onward from there.
//! The balance of this ring is nginx's, not the rendezvous table's (about ±15% over 10 backends).

/// nginx's points per unit of weight.
const POINTS_PER_WEIGHT: u32 = 160;

/// A sorted ring of (point hash, member index).
#[derive(Debug)]
pub struct Ring {
    points: Box<[(u32, u16)]>,
}

/// Hashes a key the way [`Ring::primary`] expects.
pub fn key_hash(key: &[u8]) -> u32 {
    crc32fast::hash(key)
}

/// Splits "host:port" as nginx does: at a final ':' followed only by digits.
fn host_and_port(server: &str) -> (&str, &str) {
    match server.rfind(':') {
        Some(i) if server[i + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            (&server[..i], &server[i + 1..])
        }
        _ => (server, ""),
    }
}

impl Ring {
    pub fn build(labels: &[&str], weights: &[u32]) -> Ring {
        let mut points = Vec::new();
        for (member, (label, &weight)) in labels.iter().zip(weights).enumerate() {
            let (host, port) = host_and_port(label);
            let mut base = crc32fast::Hasher::new();
            base.update(host.as_bytes());
            base.update(&[0]);
            base.update(port.as_bytes());
            let mut previous: u32 = 0;
            for _ in 0..weight.saturating_mul(POINTS_PER_WEIGHT) {
                let mut point = base.clone();
                point.update(&previous.to_le_bytes());
                previous = point.finalize();
                points.push((previous, member as u16));
            }
        }
        points.sort_unstable();
        points.dedup_by_key(|p| p.0);
        Ring {
            points: points.into(),
        }
    }

    fn first_point(&self, hash: u32) -> usize {
        let i = self.points.partition_point(|p| p.0 < hash);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// The member that owns `hash` (from [`key_hash`]); `None` for an empty ring.
    pub fn primary(&self, hash: u32) -> Option<usize> {
        self.points
            .get(self.first_point(hash))
            .map(|p| usize::from(p.1))
    }

    /// Members in the key's fallback order (each once), best first.
    pub fn ranking(&self, hash: u32, members: usize) -> Vec<usize> {
        let start = self.first_point(hash);
        let mut seen = vec![false; members];
        let mut order = Vec::with_capacity(members);
        for i in 0..self.points.len() {
            let member = usize::from(self.points[(start + i) % self.points.len()].1);
            if !seen[member] {
                seen[member] = true;
                order.push(member);
                if order.len() == members {
                    break;
                }
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_host_port_split() {
        assert_eq!(host_and_port("127.0.0.1:9001"), ("127.0.0.1", "9001"));
        assert_eq!(host_and_port("backend.local:80"), ("backend.local", "80"));
        assert_eq!(host_and_port("backend.local"), ("backend.local", ""));
        assert_eq!(host_and_port("[::1]:8080"), ("[::1]", "8080"));
    }

    #[test]
    fn points_follow_weights_and_ranking_covers_all() {
        let ring = Ring::build(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], &[1, 2, 1]);
        assert_eq!(ring.points.len(), 640);
        for key in 0..500u32 {
            let h = key_hash(&key.to_le_bytes());
            let order = ring.ranking(h, 3);
            assert_eq!(order[0], ring.primary(h).unwrap());
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2]);
        }
    }
}
