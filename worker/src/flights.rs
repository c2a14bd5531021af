//! Shared work: concurrent callers with the same key share one run (the
//! first caller's); later callers start afresh once it has finished.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use futures_util::future::{BoxFuture, FutureExt, Shared};

pub(crate) struct Flights<K, T> {
    running: Mutex<HashMap<K, Shared<BoxFuture<'static, T>>>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, T: Clone + Send + Sync + 'static> Flights<K, T> {
    pub(crate) async fn run(&self, key: K, work: impl Future<Output = T> + Send + 'static) -> T {
        let flight = self
            .running
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_insert_with(|| work.boxed().shared())
            .clone();
        let out = flight.clone().await;
        let mut running = self.running.lock().unwrap();
        if running.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            running.remove(&key);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_ones_start_afresh() {
        let flights: Arc<Flights<&str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        // Runs wait for a permit: released only once every caller is waiting.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let call = |key| {
            let (flights, runs, gate) = (flights.clone(), runs.clone(), gate.clone());
            tokio::spawn(async move {
                flights
                    .run(key, async move {
                        gate.acquire().await.unwrap().forget();
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    })
                    .await
            })
        };
        let (a, b, other) = (call("k"), call("k"), call("other"));
        tokio::task::yield_now().await;
        gate.add_permits(2);
        let got = [a.await.unwrap(), b.await.unwrap()];
        assert_eq!(got[0], got[1], "both callers of one key see the one run");
        other.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one run per key");
        let later = call("k");
        gate.add_permits(1);
        later.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "a later caller runs again");
    }
}
