//! Fair share between tenants: the virtual token counter (Sheng et al., "Fairness in Serving
//! Large Language Models", OSDI 2024), under priority bands.
//!
//! Each tenant has a counter of the service it received, in weighted tokens: `W_IN` per prompt
//! token the server computed for it (prefix-cache hits are not charged), `W_OUT` per generated
//! token, both divided by the tenant's weight. The scheduler admits the waiting request with
//! the smallest `(priority, counter of its tenant, place in the queue)`: the best priority band
//! first (vLLM's meaning: lower runs first), within it the tenant served least, within a
//! tenant first come first served. A tenant that was not backlogged (nothing waiting) has its
//! counter lifted on arrival to the smallest counter of the tenants that are, so time spent
//! idle is not saved up for a burst. Preemption takes its victim in the reverse order (the
//! worst band, then the largest counter, then the newest).
//!
//! Without tenants every request is the default tenant's, priority 0: the order is the queue's,
//! first come first served, and the victim is the newest, as before.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

/// Price of a computed prompt token.
pub const W_IN: f64 = 1.0;
/// Price of a generated token.
pub const W_OUT: f64 = 2.0;

/// Whose request it is, as the scheduler orders it.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub tenant: Arc<str>,
    /// fair-share weight (> 0)
    pub weight: f64,
    /// lower runs first
    pub priority: i64,
}

impl Default for Share {
    fn default() -> Self {
        Share {
            tenant: Arc::from("default"),
            weight: 1.0,
            priority: 0,
        }
    }
}

/// The counters of every tenant seen.
#[derive(Debug, Default)]
pub struct FairShare {
    counters: HashMap<Arc<str>, f64>,
}

impl FairShare {
    pub fn counter(&self, tenant: &str) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// Every counter, for the metrics.
    pub fn counters(&self) -> impl Iterator<Item = (&str, f64)> {
        self.counters.iter().map(|(k, v)| (&**k, *v))
    }

    /// A request of `s.tenant` arrives while `waiting` wait (before it joins them): if its
    /// tenant had nothing waiting, lift its counter to the smallest counter of the tenants
    /// that do (none: it stays).
    pub fn arrive<'a>(&mut self, s: &Share, waiting: impl IntoIterator<Item = &'a Share>) {
        let mut others_min: Option<f64> = None;
        for w in waiting {
            if w.tenant == s.tenant {
                return; // backlogged already
            }
            let c = self.counter(&w.tenant);
            others_min = Some(others_min.map_or(c, |m: f64| m.min(c)));
        }
        let c = self.counters.entry(s.tenant.clone()).or_insert(0.0);
        if let Some(m) = others_min {
            *c = c.max(m);
        }
    }

    /// Charge `tokens` weighted tokens (`W_IN` or `W_OUT` times a count) to `s`'s tenant.
    pub fn charge(&mut self, s: &Share, tokens: f64) {
        let w = if s.weight > 0.0 { s.weight } else { 1.0 };
        *self.counters.entry(s.tenant.clone()).or_insert(0.0) += tokens / w;
    }

    /// Which request goes first: the better band, then the tenant served less. Equal means
    /// the queue's own order decides.
    pub fn order(&self, a: &Share, b: &Share) -> Ordering {
        a.priority.cmp(&b.priority).then_with(|| {
            if a.tenant == b.tenant {
                Ordering::Equal
            } else {
                self.counter(&a.tenant).total_cmp(&self.counter(&b.tenant))
            }
        })
    }

    /// The place in `waiting` (in queue order) of the request to admit next.
    pub fn pick<'a>(&self, waiting: impl IntoIterator<Item = &'a Share>) -> Option<usize> {
        let mut best: Option<(usize, &Share)> = None;
        for (i, s) in waiting.into_iter().enumerate() {
            match best {
                Some((_, b)) if self.order(s, b) != Ordering::Less => {}
                _ => best = Some((i, s)),
            }
        }
        best.map(|b| b.0)
    }
}

#[cfg(test)]
mod tests {
    //! A simulated clock, no model: tenants send requests (sizes and arrival patterns of their
    //! own), a batch of `SLOTS` requests each makes one token a step, and the policy admits
    //! into free slots. Service is what VTC counts: `W_IN` per prompt token admitted, `W_OUT`
    //! per token made, over the tenant's weight.
    use super::*;

    const SLOTS: usize = 4;

    #[derive(Clone)]
    struct Req {
        share: Share,
        arrive: u64,
        prompt: usize,
        output: usize,
    }

    /// xorshift, so the runs are the same every time
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo + 1) as u64) as usize
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Policy {
        Vtc,
        Fcfs,
    }

    struct Run {
        /// largest |service difference| between two tenants both backlogged since the
        /// difference was last reset, over their weights
        worst_gap: f64,
        /// `[tenants]` weighted service at the end
        service: Vec<f64>,
        /// (step, tenant) of each admission
        admitted: Vec<(u64, usize)>,
    }

    fn simulate(reqs: &[Req], names: &[&str], policy: Policy, steps: u64) -> Run {
        let idx = |s: &Share| names.iter().position(|n| **n == *s.tenant).unwrap();
        let mut fair = FairShare::default();
        let mut pending: Vec<Req> = reqs.to_vec();
        pending.sort_by_key(|r| r.arrive);
        pending.reverse();
        let mut waiting: Vec<Req> = Vec::new();
        let mut running: Vec<(Req, usize)> = Vec::new();
        let k = names.len();
        let mut service = vec![0.0; k];
        // (service of i, service of j) when both last became backlogged
        let mut base: Vec<Vec<Option<(f64, f64)>>> = vec![vec![None; k]; k];
        let mut worst_gap: f64 = 0.0;
        let mut admitted = Vec::new();
        for t in 0..steps {
            while pending.last().is_some_and(|r| r.arrive <= t) {
                let r = pending.pop().unwrap();
                fair.arrive(&r.share, waiting.iter().map(|w| &w.share));
                waiting.push(r);
            }
            while running.len() < SLOTS && !waiting.is_empty() {
                let i = match policy {
                    Policy::Vtc => fair.pick(waiting.iter().map(|w| &w.share)).unwrap(),
                    Policy::Fcfs => 0,
                };
                let r = waiting.remove(i);
                fair.charge(&r.share, W_IN * r.prompt as f64);
                service[idx(&r.share)] += W_IN * r.prompt as f64 / r.share.weight;
                admitted.push((t, idx(&r.share)));
                running.push((r, 0));
            }
            for (r, made) in running.iter_mut() {
                *made += 1;
                fair.charge(&r.share, W_OUT);
                service[idx(&r.share)] += W_OUT / r.share.weight;
            }
            running.retain(|(r, made)| *made < r.output);
            let backlogged: Vec<bool> = (0..k)
                .map(|i| waiting.iter().any(|w| idx(&w.share) == i))
                .collect();
            for i in 0..k {
                for j in i + 1..k {
                    if backlogged[i] && backlogged[j] {
                        let (bi, bj) = *base[i][j].get_or_insert((service[i], service[j]));
                        let gap = ((service[i] - bi) - (service[j] - bj)).abs();
                        worst_gap = worst_gap.max(gap);
                    } else {
                        base[i][j] = None;
                    }
                }
            }
        }
        Run {
            worst_gap,
            service,
            admitted,
        }
    }

    /// VTC's bound on the service gap between two backlogged tenants:
    /// `2·max(W_IN·L_in, W_OUT·M)` (`M`: the tokens a full batch holds), over the smallest weight.
    fn bound(reqs: &[Req]) -> f64 {
        let l_in = reqs.iter().map(|r| r.prompt).max().unwrap() as f64;
        let m = (SLOTS * reqs.iter().map(|r| r.output).max().unwrap()) as f64;
        let w = reqs
            .iter()
            .map(|r| r.share.weight)
            .fold(f64::INFINITY, f64::min);
        2.0 * (W_IN * l_in).max(W_OUT * m) / w
    }

    fn share(name: &str, weight: f64) -> Share {
        Share {
            tenant: Arc::from(name),
            weight,
            priority: 0,
        }
    }

    #[test]
    fn two_backlogged_tenants_stay_within_the_bound_and_fcfs_does_not() {
        // A floods at once with long requests; B sends short ones steadily, all backlogged
        let mut reqs = Vec::new();
        for _ in 0..200 {
            reqs.push(Req {
                share: share("a", 1.0),
                arrive: 0,
                prompt: 120,
                output: 40,
            });
        }
        for i in 0..400 {
            reqs.push(Req {
                share: share("b", 1.0),
                arrive: i,
                prompt: 20,
                output: 8,
            });
        }
        let b = bound(&reqs);
        let vtc = simulate(&reqs, &["a", "b"], Policy::Vtc, 3000);
        let fcfs = simulate(&reqs, &["a", "b"], Policy::Fcfs, 3000);
        eprintln!(
            "two tenants: bound {b}, VTC worst gap {:.0}, FCFS worst gap {:.0}",
            vtc.worst_gap, fcfs.worst_gap
        );
        assert!(vtc.worst_gap <= b, "VTC gap {} > bound {b}", vtc.worst_gap);
        assert!(fcfs.worst_gap > b, "FCFS gap {} within {b}", fcfs.worst_gap);
    }

    #[test]
    fn five_tenants_with_weights_sizes_and_arrivals_of_their_own() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let tenants = [
            ("t0", 1.0),
            ("t1", 2.0),
            ("t2", 1.0),
            ("t3", 3.0),
            ("t4", 0.5),
        ];
        let names: Vec<&str> = tenants.iter().map(|t| t.0).collect();
        let mut reqs = Vec::new();
        for (k, &(name, w)) in tenants.iter().enumerate() {
            let mut t = 0u64;
            for _ in 0..150 {
                // t0 floods at once, t1 in bursts, the others spread out
                t += match k {
                    0 => 0,
                    1 => {
                        if rng.range(0, 9) == 0 {
                            40
                        } else {
                            0
                        }
                    }
                    _ => rng.range(0, 6) as u64,
                };
                reqs.push(Req {
                    share: share(name, w),
                    arrive: t,
                    prompt: rng.range(8, 64 * (k + 1)),
                    output: rng.range(4, 16 * (k + 1)),
                });
            }
        }
        let b = bound(&reqs);
        let vtc = simulate(&reqs, &names, Policy::Vtc, 4000);
        let fcfs = simulate(&reqs, &names, Policy::Fcfs, 4000);
        eprintln!(
            "five tenants: bound {b:.0}, VTC worst gap {:.0}, FCFS worst gap {:.0}",
            vtc.worst_gap, fcfs.worst_gap
        );
        assert!(vtc.worst_gap <= b, "VTC gap {} > bound {b}", vtc.worst_gap);
        assert!(fcfs.worst_gap > b, "FCFS gap {} within {b}", fcfs.worst_gap);
        assert!(vtc.service.iter().all(|&s| s > 0.0));
    }

    #[test]
    fn an_idle_tenant_that_returns_is_not_owed_a_burst() {
        // A and B are backlogged from the start; C sends nothing until step 1000, then floods.
        // Were C's counter not lifted, it would take every free slot until it caught up with
        // A's and B's service of 1000 steps.
        let mut reqs = Vec::new();
        for name in ["a", "b"] {
            for _ in 0..300 {
                reqs.push(Req {
                    share: share(name, 1.0),
                    arrive: 0,
                    prompt: 40,
                    output: 20,
                });
            }
        }
        for _ in 0..300 {
            reqs.push(Req {
                share: share("c", 1.0),
                arrive: 1000,
                prompt: 40,
                output: 20,
            });
        }
        let run = simulate(&reqs, &["a", "b", "c"], Policy::Vtc, 2000);
        assert!(run.worst_gap <= bound(&reqs), "gap {}", run.worst_gap);
        // of the first 30 admissions after C returns, C gets about a third, not all
        let after: Vec<usize> = run
            .admitted
            .iter()
            .filter(|a| a.0 >= 1000)
            .take(30)
            .map(|a| a.1)
            .collect();
        let c = after.iter().filter(|&&i| i == 2).count();
        assert!((6..=15).contains(&c), "C got {c} of 30: {after:?}");
    }

    #[test]
    fn priority_bands_come_before_fairness() {
        let mut reqs = Vec::new();
        for _ in 0..100 {
            reqs.push(Req {
                share: share("a", 1.0),
                arrive: 0,
                prompt: 10,
                output: 10,
            });
        }
        // B, though served far more than A by then, has the better band
        let mut urgent = share("b", 1.0);
        urgent.priority = -1;
        for i in 0..20 {
            reqs.push(Req {
                share: urgent.clone(),
                arrive: 50 + i,
                prompt: 500,
                output: 10,
            });
        }
        let run = simulate(&reqs, &["a", "b"], Policy::Vtc, 1000);
        // whenever one of A's is admitted, none of B's is waiting: every B that had arrived
        // was admitted before it
        let mut b_admitted = 0u64;
        for &(t, who) in &run.admitted {
            if who == 1 {
                b_admitted += 1;
            } else if t >= 50 {
                let b_arrived = (t - 50 + 1).min(20);
                assert_eq!(b_admitted, b_arrived, "A admitted at {t} while B waited");
            }
        }
        assert_eq!(b_admitted, 20);
        let mut f = FairShare::default();
        f.charge(&urgent, 1e9);
        assert_eq!(f.order(&urgent, &share("a", 1.0)), Ordering::Less);
        assert_eq!(f.pick([&share("a", 1.0), &urgent]), Some(1));
    }

    #[test]
    fn one_tenant_is_first_come_first_served() {
        let f = FairShare::default();
        let s = Share::default();
        assert_eq!(f.pick([&s, &s, &s]), Some(0));
        assert_eq!(f.pick(std::iter::empty::<&Share>()), None);
    }
}
