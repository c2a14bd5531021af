//! Last-use bookkeeping that costs a hit a map lookup, not a write: a use
//! is written to the store at most once per key per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::{Key, Store};

/// Keys above which the map is pruned of entries older than the interval.
const PRUNE_ABOVE: usize = 4096;

/// Decides which uses are worth writing down.
pub struct Toucher {
    every: Duration,
    written: Mutex<HashMap<Key, Instant>>,
}

impl Toucher {
    pub fn new(every: Duration) -> Toucher {
        Toucher {
            every,
            written: Mutex::new(HashMap::new()),
        }
    }

    /// Records a use of `key`: written to `store` in the background when the
    /// last write for it is older than the interval.
    pub fn used(&self, store: &Arc<dyn Store>, key: Key) {
        let now = Instant::now();
        {
            let mut written = self.written.lock().unwrap();
            if written
                .get(&key)
                .is_some_and(|at| now.duration_since(*at) < self.every)
            {
                return;
            }
            if written.len() >= PRUNE_ABOVE {
                written.retain(|_, at| now.duration_since(*at) < self.every);
            }
            written.insert(key.clone(), now);
        }
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.touch(&key, SystemTime::now()).await {
                tracing::debug!(error = %e, "could not record a use");
            }
        });
    }
}
