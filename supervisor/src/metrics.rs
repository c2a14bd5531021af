//! The supervisor's own metrics, and the merge of every worker's exposition
//! into one Prometheus text page.
//!
//! Each worker labels its series with `upstream`; a metric family may appear
//! only once in a page, so families are merged by name rather than the texts
//! concatenated. The supervisor's process metrics carry no `upstream` label.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    registry: Registry,
    pub worker_restarts: IntCounterVec,
    pub worker_up: IntGaugeVec,
    /// By status class (1xx-5xx), resolved once: one per request.
    front_requests: [IntCounter; 5],
    pub preload_images: IntCounterVec,
    pub preload_bytes: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let worker_restarts = IntCounterVec::new(
            Opts::new(
                "regcache_worker_restarts_total",
                "Worker processes restarted after dying.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let worker_up = IntGaugeVec::new(
            Opts::new(
                "regcache_worker_up",
                "1 when the upstream's worker is ready.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let front_requests = IntCounterVec::new(
            Opts::new(
                "regcache_front_requests_total",
                "Requests at the front listener, by status class.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let preload_images = IntCounterVec::new(
            Opts::new(
                "regcache_preload_images_total",
                "Images preloaded (REGCACHE_PRELOAD_FILE, POST /api/v1/preload), by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let preload_bytes = IntCounter::new(
            "regcache_preload_bytes_total",
            "Blob bytes fetched by preloading.",
        )
        .expect("valid metric");
        for c in [
            Box::new(worker_restarts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(worker_up.clone()),
            Box::new(front_requests.clone()),
            Box::new(preload_images.clone()),
            Box::new(preload_bytes.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Metrics {
            registry,
            worker_restarts,
            worker_up,
            front_requests: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| front_requests.with_label_values(&[class])),
            preload_images,
            preload_bytes,
        }
    }

    pub fn front(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.front_requests[class].inc();
    }

    pub fn render(&self) -> String {
        regcache_worker::metrics::render(&self.registry)
    }
}

/// One metric family as found in a text page.
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    /// `name{labels}` and value, in first-seen order.
    samples: Vec<(String, f64)>,
}

impl Family {
    /// Adds a sample line; the same series from another page is summed (the
    /// supervisor counts the hits it serves under the worker's labels).
    fn add(&mut self, line: &str) {
        let (series, value) = match line.rsplit_once(' ') {
            Some((s, v)) => (s.trim_end(), v.parse::<f64>().unwrap_or(f64::NAN)),
            None => (line, f64::NAN),
        };
        match self.samples.iter_mut().find(|(s, _)| s == series) {
            Some((_, total)) => *total += value,
            None => self.samples.push((series.to_string(), value)),
        }
    }
}

/// Merges text expositions: one HELP/TYPE per family, samples of all pages,
/// identical series summed.
pub fn merge<'a>(pages: impl IntoIterator<Item = &'a str>) -> String {
    let mut families: Vec<Family> = Vec::new();
    let index_of = |families: &mut Vec<Family>, name: &str| -> usize {
        match families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                families.push(Family {
                    name: name.to_string(),
                    help: None,
                    kind: None,
                    samples: Vec::new(),
                });
                families.len() - 1
            }
        }
    };
    for page in pages {
        let mut current: Option<usize> = None;
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split_whitespace().next().unwrap_or("");
                let i = index_of(&mut families, name);
                families[i].help.get_or_insert_with(|| line.to_string());
                current = Some(i);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split_whitespace().next().unwrap_or("");
                let i = index_of(&mut families, name);
                families[i].kind.get_or_insert_with(|| line.to_string());
                current = Some(i);
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let i = match current {
                    Some(i) => i,
                    None => {
                        let name = line.split(['{', ' ']).next().unwrap_or("");
                        index_of(&mut families, name)
                    }
                };
                families[i].add(line);
            }
        }
    }
    let mut out = String::new();
    for f in families {
        for l in f.help.iter().chain(f.kind.iter()) {
            out.push_str(l);
            out.push('\n');
        }
        for (series, value) in &f.samples {
            out.push_str(&format!("{series} {value}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_appear_once() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{upstream=\"a\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\",upstream=\"a\"} 1\nh_sum{upstream=\"a\"} 1\nh_count{upstream=\"a\"} 1\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{upstream=\"b\"} 2\n";
        let m = merge([a, b]);
        assert_eq!(m.matches("# TYPE x_total").count(), 1);
        let x = m.find("x_total{upstream=\"a\"}").unwrap();
        let y = m.find("x_total{upstream=\"b\"}").unwrap();
        let h = m.find("# HELP h").unwrap();
        assert!(x < y && y < h, "samples of a family stay together:\n{m}");
        assert!(m.contains("h_count{upstream=\"a\"} 1"));
    }

    #[test]
    fn the_same_series_from_two_pages_is_summed() {
        let a = "# TYPE x_total counter\nx_total{upstream=\"a\"} 2\n";
        let b = "# TYPE x_total counter\nx_total{upstream=\"a\"} 3\nx_total{upstream=\"b\"} 1\n";
        let m = merge([a, b]);
        assert!(m.contains("x_total{upstream=\"a\"} 5\n"), "{m}");
        assert!(m.contains("x_total{upstream=\"b\"} 1\n"), "{m}");
    }
}
