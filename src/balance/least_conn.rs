//! Weighted least-connections.
//!
//! The backend with the fewest in-flight requests relative to its weight wins (compared by cross
//! multiplication, so no division). Backends that tie share requests by smooth weighted round-robin,
//! as nginx does: under light load, when every count is zero, traffic still follows the weights, and
//! equal weights alternate instead of always favouring the first backend. The round-robin scores are
//! atomics in each backend's live state, so picking takes no lock; concurrent pickers can interleave
//! their updates, which only perturbs the tie-break, never the load comparison.

use std::sync::atomic::Ordering;

use super::Candidate;

pub(super) fn pick<C: Candidate>(members: &[C], usable: &impl Fn(usize) -> bool) -> Option<usize> {
    // Pass 1: the lowest in-flight/weight ratio among usable members.
    let mut candidates = members.iter().enumerate().filter(|(i, _)| usable(*i));
    let (mut best, first) = candidates.next()?;
    let (mut best_load, mut best_weight) = (first.inflight() as u64, u64::from(first.weight()));
    for (i, m) in candidates {
        let (load, weight) = (m.inflight() as u64, u64::from(m.weight()));
        if load * best_weight < best_load * weight {
            (best, best_load, best_weight) = (i, load, weight);
        }
    }
    // Pass 2: smooth weighted round-robin among the backends at that ratio.
    let mut chosen = None;
    let mut chosen_score = i64::MIN;
    let mut tied_weight = 0i64;
    for (i, m) in members.iter().enumerate() {
        let (load, weight) = (m.inflight() as u64, u64::from(m.weight()));
        if load * best_weight != best_load * weight || !usable(i) {
            continue;
        }
        let weight = i64::from(m.weight());
        tied_weight += weight;
        let score = m.smooth_weight().fetch_add(weight, Ordering::Relaxed) + weight;
        if score > chosen_score {
            (chosen, chosen_score) = (Some(i), score);
        }
    }
    // Counts may have moved between the passes so that nothing tied; the first pass's winner stands.
    let Some(index) = chosen else {
        return Some(best);
    };
    members[index]
        .smooth_weight()
        .fetch_sub(tied_weight, Ordering::Relaxed);
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Balancer;
    use crate::upstream::{Backend, Member, Upstream};
    use std::sync::Arc;

    fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let addr = format!("127.0.0.1:{}", 9000 + i);
                Member::new(
                    Arc::new(Backend::new(addr.parse().unwrap(), &addr)),
                    weight,
                    "u",
                )
            })
            .collect()
    }

    fn counts(members: &[Member], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; members.len()];
        for _ in 0..picks {
            counts[pick(members, &|_| true).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn empty_upstream_has_no_pick() {
        assert_eq!(pick::<Member>(&[], &|_| true), None);
        assert_eq!(
            pick(&members(&[1, 1]), &|_| false),
            None,
            "no usable member, no pick"
        );
        assert_eq!(pick(&members(&[1, 1]), &|i| i == 1), Some(1));
    }

    #[test]
    fn idle_backends_follow_weights() {
        assert_eq!(counts(&members(&[1, 1, 1]), 300), vec![100, 100, 100]);
        assert_eq!(counts(&members(&[2, 1]), 300), vec![200, 100]);
        assert_eq!(counts(&members(&[5, 1, 1]), 700), vec![500, 100, 100]);
    }

    #[test]
    fn fewest_inflight_relative_to_weight_wins() {
        let m = members(&[1, 1, 2]);
        let upstream = Upstream::new(
            "u",
            m.clone().into(),
            Balancer::LeastConn,
            Default::default(),
        );
        let _busy: Vec<_> = (0..3).map(|_| upstream.start_on(0)).collect();
        let _one = upstream.start_on(1);
        let _two: Vec<_> = (0..2).map(|_| upstream.start_on(2)).collect();
        // Ratios: 3/1, 1/1, 2/2: the last two tie and alternate; the busy one never wins.
        let c = counts(&m, 100);
        assert_eq!(c[0], 0);
        assert_eq!(c[1] + c[2], 100);
        assert!(
            c[1].abs_diff(c[2]) <= 34,
            "tie broken by weight 1:2, got {c:?}"
        );
    }

    #[test]
    fn guard_returns_the_counts() {
        let upstream = Upstream::new(
            "u",
            members(&[1]).into(),
            Balancer::LeastConn,
            Default::default(),
        );
        let (_, member, guard) = upstream.pick(None, &[], 0).unwrap();
        assert_eq!(member.backend.inflight(), 1);
        assert_eq!(upstream.inflight.load(Ordering::Relaxed), 1);
        drop(guard);
        assert_eq!(upstream.members[0].backend.inflight(), 0);
        assert_eq!(upstream.inflight.load(Ordering::Relaxed), 0);
    }
}
