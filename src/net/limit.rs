//! A bandwidth cap shared by every stream to one peer: a virtual-clock token bucket (the
//! generic cell rate algorithm). Each send moves a "theoretical arrival time" forward by
//! its size at the configured rate and waits until that time, less a burst allowance, has
//! come. No background task, no refill loop; one lock per frame.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Traffic that may pass at once after a quiet spell: 50 ms at the capped rate.
const BURST: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: f64,
    tat: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            tat: Mutex::new(None),
        }
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes_per_sec
    }

    /// Waits until `bytes` more fit under the cap.
    pub async fn take(&self, bytes: u64) {
        let wake = {
            let mut tat = self.tat.lock().expect("rate limit lock");
            let now = Instant::now();
            let start = tat.map_or(now, |t| t.max(now));
            let next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            *tat = Some(next);
            next.checked_sub(BURST).filter(|w| *w > now)
        };
        if let Some(w) = wake {
            tokio::time::sleep_until(w).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused tokio time: the clock is virtual, so this measures the limiter, not the machine.
    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_over_many_sends_from_several_tasks() {
        let limit = std::sync::Arc::new(RateLimit::new(10 << 20)); // 10 MiB/s
        let t = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = limit.clone();
                tokio::spawn(async move {
                    for _ in 0..40 {
                        l.take(64 << 10).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // 4 x 40 x 64 KiB = 10 MiB at 10 MiB/s: one second, less the 50 ms burst.
        let took = t.elapsed().as_secs_f64();
        assert!(
            (0.94..=1.0).contains(&took),
            "took {took} s of virtual time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_link_lets_a_burst_through_at_once() {
        let limit = RateLimit::new(1 << 20);
        let t = Instant::now();
        limit.take(32 << 10).await; // 31 ms of traffic < 50 ms burst
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
