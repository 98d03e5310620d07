//! Which recovery points a DR site keeps, as a pure function of the points and the clock.
//!
//! A rule is a count and, optionally, a window. With a count only, the newest `count`
//! points stay. With a window, the newest `recent` points stay whole (the last minutes at
//! full resolution, and every point an `apply_delay` may choose), and the older ones are
//! spread over the window: walking from the oldest, a
//! point is kept when it is at least `window / (count - recent)` newer than the last point
//! kept (less a tenth, so a cycle that ran a little early does not lose its slot), and
//! points older than the window go. The walk is anchored on the oldest kept points, which
//! do not move as new points arrive, so a point kept once stays until it ages out: the
//! ladder does not churn. The newest point (the consistent one), held points and a
//! running drill's point are always kept; they count toward `count`.
//!
//! Pruning happens only when a new point is added: while the primary is gone, nothing
//! ages out.

use std::time::Duration;

use super::RecoveryPoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub count: usize,
    pub window: Option<Duration>,
    /// The newest this many are kept whatever their spacing (counted in `count`).
    pub recent: usize,
}

impl Retention {
    /// The newest `count` points.
    pub fn count(count: usize) -> Self {
        Retention {
            count,
            window: None,
            recent: 0,
        }
    }

    /// The least gap between two kept points of the ladder, in ms: the window over the
    /// slots the recent points leave.
    fn spacing_ms(&self) -> u64 {
        match self.window {
            Some(w) => {
                let slots = self.count.saturating_sub(self.recent).max(1) as u64;
                let gap = w.as_millis() as u64 / slots;
                gap - gap / 10
            }
            _ => 0,
        }
    }
}

/// Removes from `points` (oldest first) those `rule` does not keep at `now_ms`, returning
/// them oldest first.
pub fn prune(points: &mut Vec<RecoveryPoint>, rule: Retention, now_ms: u64) -> Vec<RecoveryPoint> {
    let n = points.len();
    let taken = |p: &RecoveryPoint| p.point.point.taken_at_ms;
    let too_old = |p: &RecoveryPoint| {
        rule.window
            .is_some_and(|w| now_ms.saturating_sub(taken(p)) > w.as_millis() as u64)
    };
    let spacing = rule.spacing_ms();
    let mut keep = vec![false; n];
    let mut last: Option<u64> = None;
    for (i, p) in points.iter().enumerate() {
        let pinned = p.pinned() || i + 1.max(rule.recent) >= n;
        let spaced = last.is_none_or(|l| taken(p).saturating_sub(l) >= spacing);
        if pinned || (!too_old(p) && spaced) {
            keep[i] = true;
            last = Some(taken(p));
        }
    }
    // At most `count`: the oldest unpinned go first.
    let mut excess = keep
        .iter()
        .filter(|k| **k)
        .count()
        .saturating_sub(rule.count.max(1));
    for i in 0..n.saturating_sub(1) {
        if excess == 0 {
            break;
        }
        if keep[i] && !points[i].pinned() {
            keep[i] = false;
            excess -= 1;
        }
    }
    let mut pruned = Vec::new();
    let mut i = 0;
    points.retain(|p| {
        let k = keep[i];
        i += 1;
        if !k {
            pruned.push(p.clone());
        }
        k
    });
    pruned
}

/// The point a failover recovers unless told otherwise: the newest, or with an
/// `apply_delay` the newest at least that old (a delayed replica against mistakes the
/// primary replicated), and the oldest kept when none is that old yet. None when no point
/// is kept (the consistent point is then the only one).
pub fn failover_default(
    points: &[RecoveryPoint],
    delay: Option<Duration>,
    now_ms: u64,
) -> Option<&RecoveryPoint> {
    let Some(d) = delay else {
        return points.last();
    };
    let old_enough = |p: &&RecoveryPoint| {
        now_ms.saturating_sub(p.point.point.taken_at_ms) >= d.as_millis() as u64
    };
    points.iter().rev().find(old_enough).or(points.first())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CycleId, Gen, Point};
    use crate::store::PointRecord;

    const MIN: u64 = 60_000;

    fn point(gen: u64, at: u64, held: bool) -> RecoveryPoint {
        RecoveryPoint {
            point: PointRecord {
                point: Point {
                    gen: Gen(gen),
                    cycle: CycleId(gen),
                    taken_at_ms: at,
                },
                volumes: Default::default(),
            },
            snapshots: Default::default(),
            held,
            files: Default::default(),
            drill: None,
        }
    }

    fn gens(points: &[RecoveryPoint]) -> Vec<u64> {
        points.iter().map(|p| p.point.point.gen.0).collect()
    }

    /// Adds gens 1..=n, one every `every` ms, pruning after each as the DR site does.
    fn run(n: u64, every: u64, rule: Retention, held: &[u64]) -> Vec<RecoveryPoint> {
        let mut points = Vec::new();
        for g in 1..=n {
            points.push(point(g, g * every, held.contains(&g)));
            prune(&mut points, rule, g * every);
        }
        points
    }

    #[test]
    fn a_count_keeps_the_newest_and_the_held() {
        let kept = run(8, MIN, Retention::count(5), &[2]);
        assert_eq!(gens(&kept), [2, 5, 6, 7, 8]);
        assert_eq!(gens(&run(3, MIN, Retention::count(1), &[])), [3]);
    }

    #[test]
    fn a_window_spreads_the_count_over_it_and_kept_points_stay() {
        // One cycle a minute for three hours, 7 points over 1 h: one each 8 or 9 minutes.
        let rule = Retention {
            count: 7,
            window: Some(Duration::from_secs(3600)),
            recent: 0,
        };
        let mut points: Vec<RecoveryPoint> = Vec::new();
        for g in 1..=180u64 {
            let oldest = points.first().map(|p| p.point.point.gen.0);
            points.push(point(g, g * MIN, false));
            for p in prune(&mut points, rule, g * MIN) {
                // Only the point just superseded, or the oldest (aged out or over the
                // count): the ladder in between never moves.
                let p = p.point.point.gen.0;
                assert!(p == g - 1 || Some(p) == oldest, "gen {g} pruned {p}");
            }
            assert!(points.len() <= 7, "gen {g}: {:?}", gens(&points));
        }
        let kept = gens(&points);
        assert_eq!(kept.last(), Some(&180));
        // Spread over the last hour: the oldest within the window, gaps of ~10 minutes.
        assert!(kept[0] >= 120, "{kept:?}");
        for w in kept.windows(2).take(kept.len() - 2) {
            assert!((8..=9).contains(&(w[1] - w[0])), "{kept:?}");
        }
    }

    #[test]
    fn a_slightly_early_cycle_keeps_its_slot() {
        // Hourly points, a day's worth: 25 with a 24 h window. Each cycle runs 30 s early.
        let rule = Retention {
            count: 25,
            window: Some(Duration::from_secs(24 * 3600)),
            recent: 0,
        };
        let kept = run(48, 60 * MIN - 30_000, rule, &[]);
        assert_eq!(kept.len(), 25, "{:?}", gens(&kept));
    }

    #[test]
    fn nothing_ages_out_without_a_new_point_and_held_points_survive_the_window() {
        let rule = Retention {
            count: 5,
            window: Some(Duration::from_secs(600)),
            recent: 0,
        };
        let mut points = run(5, MIN, rule, &[1]);
        assert_eq!(gens(&points), [1, 3, 5]);
        // A day later, the next point: everything but it and the held one is too old.
        points.push(point(6, 24 * 60 * MIN, false));
        let pruned = prune(&mut points, rule, 24 * 60 * MIN);
        assert_eq!(gens(&points), [1, 6]);
        assert_eq!(gens(&pruned), [3, 5]);
    }

    #[test]
    fn the_recent_points_stay_whole_and_the_older_ones_thin_out() {
        // One a minute for two hours; the last 5 whole, then one each 30 minutes.
        let rule = Retention {
            count: 9,
            window: Some(Duration::from_secs(2 * 3600)),
            recent: 5,
        };
        let kept = gens(&run(120, MIN, rule, &[]));
        assert_eq!(
            kept[kept.len() - 5..],
            [116, 117, 118, 119, 120],
            "{kept:?}"
        );
        let older = &kept[..kept.len() - 5];
        assert!(older.len() >= 3, "{kept:?}");
        for w in older.windows(2) {
            assert!((27..=30).contains(&(w[1] - w[0])), "{kept:?}");
        }
    }

    #[test]
    fn a_delay_makes_the_newest_point_old_enough_the_default() {
        let points = run(6, MIN, Retention::count(6), &[]);
        let at = |d: Option<u64>, now: u64| {
            failover_default(
                &points,
                d.map(|m| Duration::from_millis(m * MIN)),
                now * MIN,
            )
            .map(|p| p.point.point.gen.0)
        };
        assert_eq!(at(None, 6), Some(6));
        assert_eq!(at(Some(3), 6), Some(3));
        assert_eq!(at(Some(3), 100), Some(6));
        // None old enough: the oldest kept.
        assert_eq!(at(Some(30), 6), Some(1));
        assert_eq!(failover_default(&[], Some(Duration::from_secs(1)), 0), None);
    }
}
