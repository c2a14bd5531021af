//! What the status page, `/api/v1/status` and `regcache status` show: every
//! upstream's state, hit ratio and bytes saved (since start and over the
//! last hour), size against budget, downloads in progress, recent pulls.
//!
//! Figures since start come from the workers' own counts plus the hits the
//! front answered itself; the last hour is the difference to a sample kept
//! once a minute ([`History`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regcache_protocol::internal::{FillProgress, Totals};
use serde::{Deserialize, Serialize};

/// Samples kept per upstream: an hour of minutes, and one more.
const SAMPLES: usize = 61;
/// Pulls remembered for the page.
const RECENT: usize = 50;

/// The whole picture.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusPage {
    pub version: String,
    pub now_ms: u64,
    pub uptime_seconds: u64,
    pub upstreams: Vec<UpstreamStatus>,
    pub recent: Vec<Pull>,
    pub preload: crate::preload::Report,
}

/// One upstream, as the page shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    /// `ready`, `restarting`, `upstream away` (breaker open or rate
    /// limited), `offline`, or `store degraded`.
    pub state: String,
    pub detail: Option<String>,
    pub restarts: u64,
    pub since_start: Totals,
    pub last_hour: Totals,
    /// Hits over all answers (`None`: no answers yet).
    pub hit_ratio: Option<f64>,
    pub hit_ratio_last_hour: Option<f64>,
    pub stored_bytes: u64,
    /// 0: no budget.
    pub budget_bytes: u64,
    pub store: String,
    pub members: u64,
    pub fills: Vec<FillProgress>,
}

/// A pull by tag the front saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pull {
    pub at_ms: u64,
    pub upstream: String,
    pub image: String,
    /// `X-Cache` of the answer.
    pub cache: String,
}

pub fn ratio(t: &Totals) -> Option<f64> {
    let all = t.hits + t.misses;
    (all > 0).then(|| t.hits as f64 / all as f64)
}

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Once-a-minute samples of each upstream's totals.
pub struct History {
    samples: Mutex<Vec<VecDeque<(Instant, Totals)>>>,
    pub started: Instant,
}

impl History {
    pub fn new(upstreams: usize) -> History {
        History {
            samples: Mutex::new(vec![VecDeque::new(); upstreams]),
            started: Instant::now(),
        }
    }

    /// Records `now`'s totals of upstream `i`.
    pub fn sample(&self, i: usize, totals: Totals) {
        let mut s = self.samples.lock().unwrap();
        if let Some(q) = s.get_mut(i) {
            if q.len() >= SAMPLES {
                q.pop_front();
            }
            q.push_back((Instant::now(), totals));
        }
    }

    /// What upstream `i` did within the last hour, its totals being `now`.
    pub fn last_hour(&self, i: usize, now: Totals) -> Totals {
        let s = self.samples.lock().unwrap();
        let hour_ago = Instant::now().checked_sub(Duration::from_secs(3600));
        let base = s.get(i).and_then(|q| {
            q.iter()
                .find(|(at, _)| hour_ago.is_none_or(|h| *at >= h))
                .map(|(_, t)| *t)
        });
        match base {
            // Younger than the oldest sample that is in the hour: all of it.
            Some(b) if self.started.elapsed() >= Duration::from_secs(3600) => Totals {
                hits: now.hits.saturating_sub(b.hits),
                misses: now.misses.saturating_sub(b.misses),
                cache_bytes: now.cache_bytes.saturating_sub(b.cache_bytes),
                upstream_bytes: now.upstream_bytes.saturating_sub(b.upstream_bytes),
            },
            _ => now,
        }
    }
}

/// The last pulls by tag.
#[derive(Default)]
pub struct Recent(Mutex<VecDeque<Pull>>);

impl Recent {
    pub fn push(&self, pull: Pull) {
        let mut q = self.0.lock().unwrap();
        if q.len() >= RECENT {
            q.pop_back();
        }
        q.push_front(pull);
    }

    pub fn list(&self) -> Vec<Pull> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

/// A status page from its JSON.
pub fn parse(json: &[u8]) -> Result<StatusPage, serde_json::Error> {
    serde_json::from_slice(json)
}

/// The picture for a terminal (`regcache status`).
pub fn text(p: &StatusPage) -> String {
    use regcache_store::policy::size;
    let pct = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{:.1} %", r * 100.0));
    let mut s = format!(
        "regcache {}, up {} min\n\n{:<28} {:<15} {:>9} {:>9} {:>11} {:>11} {:>20}\n",
        p.version,
        p.uptime_seconds / 60,
        "UPSTREAM",
        "STATE",
        "HIT 1H",
        "HIT ALL",
        "FROM CACHE",
        "UPSTREAM",
        "STORED / BUDGET"
    );
    for u in &p.upstreams {
        let stored = if u.budget_bytes > 0 {
            format!("{} / {}", size(u.stored_bytes), size(u.budget_bytes))
        } else {
            size(u.stored_bytes)
        };
        s.push_str(&format!(
            "{:<28} {:<15} {:>9} {:>9} {:>11} {:>11} {:>20}\n",
            u.name,
            u.state,
            pct(u.hit_ratio_last_hour),
            pct(u.hit_ratio),
            size(u.since_start.cache_bytes),
            size(u.since_start.upstream_bytes),
            stored
        ));
        for f in &u.fills {
            let done = match f.total {
                Some(t) if t > 0 => format!(
                    "{:.0} % of {}",
                    100.0 * f.written as f64 / t as f64,
                    size(t)
                ),
                _ => size(f.written),
            };
            s.push_str(&format!(
                "    downloading {} {} {done}\n",
                f.repository,
                &f.digest[..f.digest.len().min(19)]
            ));
        }
    }
    if !p.recent.is_empty() {
        s.push_str("\nrecent pulls:\n");
        for r in p.recent.iter().take(10) {
            let ago = p.now_ms.saturating_sub(r.at_ms) / 1000;
            s.push_str(&format!(
                "  {ago:>6} s ago  {:<8} {} ({})\n",
                r.cache, r.image, r.upstream
            ));
        }
    }
    if p.preload.configured || p.preload.runs > 0 {
        let failed = p
            .preload
            .images
            .iter()
            .filter(|i| i.state == "failed")
            .count();
        s.push_str(&format!(
            "\npreload: {} run(s), {} image(s), {failed} failed{}\n",
            p.preload.runs,
            p.preload.images.len(),
            if p.preload.running { ", running" } else { "" }
        ));
    }
    s
}

/// The page, embedded: HTML, CSS and script in one file, nothing fetched
/// from anywhere but this cache's own API.
pub const PAGE: &str = include_str!("status.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_the_recent_list_are_bounded() {
        let t = Totals {
            hits: 3,
            misses: 1,
            ..Totals::default()
        };
        assert_eq!(ratio(&t), Some(0.75));
        assert_eq!(ratio(&Totals::default()), None);
        let r = Recent::default();
        for i in 0..(RECENT + 5) {
            r.push(Pull {
                at_ms: i as u64,
                upstream: "u".into(),
                image: "i".into(),
                cache: "HIT".into(),
            });
        }
        let list = r.list();
        assert_eq!(list.len(), RECENT);
        assert_eq!(list[0].at_ms, (RECENT + 4) as u64, "newest first");
    }

    #[test]
    fn within_the_first_hour_the_last_hour_is_everything() {
        let h = History::new(1);
        h.sample(0, Totals::default());
        let now = Totals {
            hits: 5,
            ..Totals::default()
        };
        assert_eq!(h.last_hour(0, now), now);
    }
}
